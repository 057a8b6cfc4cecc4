#!/usr/bin/env bash
# Test the ways users install kernelhib, on a machine without Node.js: Node.js is hidden
# (scripts/without-node.sh) from everything a user runs. Each step starts from a fresh copy
# of this checkout (its tracked and untracked files, none it ignores: no build outputs).
#
#   1. `python -m build` builds the sdist and, from it, the wheel; the wheel installs into a
#      fresh venv (with JupyterLab) and carries the JupyterLab extension and the server's
#      config: `jupyter labextension list` and `jupyter server extension list` show kernelhib
#      enabled, and the venv holds no Node.js.
#   2. The Quick Start: `bash scripts/lab.sh` sets up and starts JupyterLab, whose page loads
#      kernelhib's extension; `jupyter labextension list` shows it enabled. Then, with Node.js
#      visible again (Playwright's, not the user's), Chromium shows the toolbar button
#      (labextension/ui-tests/extension.spec.ts) in that JupyterLab.
#
#   bash scripts/test-install.sh
#
# Needs root and a git checkout. Installs what the browser test needs (scripts/ui-deps.sh) and
# git. Node packages come from labextension's yarn cache where it has them.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
say() { printf "==> %s [at %d s]\n" "$*" "$SECONDS"; }
fail() {
    printf 'test-install.sh: %s\n' "$*" >&2
    exit 1
}
without_node() { bash "$repo/scripts/without-node.sh" "$@"; }
# `jupyter labextension list` or `jupyter server extension list` in a venv, without Node.js:
# kernelhib enabled and OK.
check_enabled() {
    local venv="$1" listing
    shift
    listing="$(without_node "$venv/bin/jupyter" "$@" 2>&1)" ||
        fail "jupyter $* failed in $venv:"$'\n'"$listing"
    # labextension: "kernelhib v0.1.0 enabled OK ..."; server: "kernelhib enabled", "kernelhib 0.1.0 OK".
    grep -qE '^\s+kernelhib\s.*enabled' <<<"$listing" &&
        grep -qE "^\\s+kernelhib v?${version//./\\.}\\s.*OK" <<<"$listing" ||
        fail "jupyter $* shows no kernelhib $version enabled and OK in $venv:"$'\n'"$listing"
    say "jupyter $* ($venv): kernelhib $version enabled, OK"
}

bash scripts/ui-deps.sh
# The fresh copies are made of what git tracks and would track.
if ! command -v git >/dev/null; then
    say "Installing system packages: git"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends git
fi
git rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    fail "$repo is not a git checkout: the fresh copies are made of its tracked and untracked files"

tmp="$(mktemp -d /tmp/kernelhib-install.XXXXXX)"
lab_pid=""
cleanup() {
    [[ -z "$lab_pid" ]] || kill -TERM -- "-$lab_pid" 2>/dev/null || true # its process group
    rm -rf "$tmp"
}
trap cleanup EXIT
fresh_copy() {
    mkdir -p "$1"
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do
            [[ -e "$file" || -L "$file" ]] && printf '%s\0' "$file" # not deleted here
        done |
        tar -c --null -T - | tar -x -C "$1"
}
# The npm packages the extension's build downloads: from the cache a build here filled.
export YARN_CACHE_FOLDER="$repo/labextension/.yarn/cache"
version="$(.venv/bin/python -c 'import json; print(json.load(open("labextension/package.json"))["version"])')"

# 1. The wheel, built and installed without Node.js.
say "1. python -m build, from a fresh copy, without Node.js"
fresh_copy "$tmp/src"
without_node .venv/bin/python -m build --outdir "$tmp/dist" "$tmp/src" >"$tmp/build.log" 2>&1 ||
    fail "python -m build failed:"$'\n'"$(tail -40 "$tmp/build.log")"
wheel="$tmp/dist/kernelhib-$version-py3-none-any.whl"
[[ -f "$wheel" && -f "$tmp/dist/kernelhib-$version.tar.gz" ]] ||
    fail "python -m build made $(ls "$tmp/dist"), not kernelhib $version's wheel and sdist"
say "Installing $(basename "$wheel") and JupyterLab into a fresh venv, without Node.js"
without_node python3 -m venv "$tmp/wheel-venv"
without_node "$tmp/wheel-venv/bin/python" -m pip install -q --disable-pip-version-check \
    "$wheel" "jupyterlab>=4,<5"
for file in share/jupyter/labextensions/kernelhib/static/style.js \
    share/jupyter/labextensions/kernelhib/package.json \
    share/jupyter/labextensions/kernelhib/install.json \
    etc/jupyter/jupyter_server_config.d/kernelhib.json; do
    [[ -f "$tmp/wheel-venv/$file" ]] || fail "the wheel did not install $file"
done
[[ ! -e "$tmp/wheel-venv/bin/node" ]] || fail "installing the wheel installed Node.js"
installed="$("$tmp/wheel-venv/bin/python" -c 'import kernelhib; print(kernelhib.__version__)')"
[[ "$installed" == "$version" ]] ||
    fail "kernelhib.__version__ is $installed, labextension/package.json says $version"
check_enabled "$tmp/wheel-venv" labextension list
check_enabled "$tmp/wheel-venv" server extension list

# 2. The Quick Start, without Node.js: scripts/lab.sh in a fresh copy.
say "2. The Quick Start, from a fresh copy, without Node.js: bash scripts/lab.sh"
fresh_copy "$tmp/quickstart"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
JUPYTER_PORT="$port" setsid bash "$repo/scripts/without-node.sh" bash "$tmp/quickstart/scripts/lab.sh" \
    --ServerApp.port_retries=0 >"$tmp/lab.log" 2>&1 &
lab_pid=$!
url=""
for _ in $(seq 600); do # the setup builds the extension: a few minutes at most
    url="$(grep -oE "http://127\.0\.0\.1:$port/lab/tree/demo\.ipynb\?token=[0-9a-f]+" "$tmp/lab.log" || true)"
    [[ -n "$url" ]] && break
    kill -0 "$lab_pid" 2>/dev/null || fail "scripts/lab.sh exited:"$'\n'"$(tail -40 "$tmp/lab.log")"
    sleep 1
done
[[ -n "$url" ]] || fail "scripts/lab.sh printed no URL in 10 min:"$'\n'"$(tail -40 "$tmp/lab.log")"
# JupyterLab's page lists the prebuilt extensions it loads in its page config.
.venv/bin/python - "$url" <<'PY' || fail "JupyterLab at $url does not load kernelhib's extension"
import json, re, sys, urllib.request

page = urllib.request.urlopen(sys.argv[1], timeout=30).read().decode()
config = json.loads(re.search(r'id="jupyter-config-data"[^>]*>(.*?)</script>', page, re.S)[1])
names = [extension["name"] for extension in config["federated_extensions"]]
if "kernelhib" not in names:
    sys.exit(f"its page config loads only {names}")
PY
say "scripts/lab.sh: JupyterLab's page loads kernelhib's extension"
kill -TERM "$lab_pid" # lab.sh stops JupyterLab
wait "$lab_pid" || true
lab_pid=""
check_enabled "$tmp/quickstart/.venv" labextension list

say "Chromium: the toolbar button, in JupyterLab as the Quick Start installed it"
(cd labextension && CHROMIUM=/usr/bin/chromium KERNELHIB_JUPYTER="$tmp/quickstart/.venv/bin/jupyter" \
    "$repo/.venv/bin/jlpm" test:ui ui-tests/extension.spec.ts)
say "Installs without Node.js: wheel and Quick Start OK"
