#!/usr/bin/env bash
# What the browser tests (scripts/test-ui.sh, scripts/test-install.sh) need, installed where
# missing: Debian's chromium (and nodejs, for Playwright and jest, if there is no node);
# .venv with kernelhib, JupyterLab and CRIU (scripts/setup.sh --lab); the Node packages of
# labextension/yarn.lock, from the npm registry. Playwright downloads no browser. Needs root.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
say() { printf '==> %s\n' "$*"; }

# 1. System packages: Chromium for the browser test, Node.js for Playwright and jest.
missing=()
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
if ((${#missing[@]})); then
    say "Installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
say "$(node --version | sed 's/^/Node.js /'), $(/usr/bin/chromium --version 2>/dev/null)"

# 2. .venv with kernelhib, JupyterLab (whose jlpm runs the Node tools) and CRIU.
bash scripts/setup.sh --lab

# 3. Node packages, exactly as labextension/yarn.lock says.
say "jlpm install --immutable (labextension/)"
(cd labextension && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$repo/.venv/bin/jlpm" install --immutable)
