#!/usr/bin/env bash
# Test kernelhib's JupyterLab extension (labextension/): type checks, formatting
# and the jest unit tests of its state logic; then it builds the extension,
# installs it into .venv, and runs the browser test (Playwright driving Debian's
# Chromium against a real JupyterLab with kernelhib and CRIU). Needs root.
#
#   bash scripts/test-ui.sh                # all of the above
#   bash scripts/test-ui.sh --screenshots  # also write the browser test's screenshots to docs/images/
#
# Installs what is missing (scripts/ui-deps.sh): Debian's chromium (and nodejs if
# there is no node), .venv with JupyterLab and CRIU (scripts/setup.sh --lab), and
# the Node packages of labextension/yarn.lock from the npm registry. Playwright
# downloads no browser.
set -euo pipefail

screenshots=0
for arg in "$@"; do
    case "$arg" in
        --screenshots) screenshots=1 ;;
        -h | --help)
            sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "test-ui.sh: unknown argument '$arg' (use --screenshots)" >&2
            exit 2
            ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
say() { printf '==> %s\n' "$*"; }

# 1. Chromium, Node.js, .venv with JupyterLab and CRIU, the Node packages.
bash scripts/ui-deps.sh
export PATH="$repo/.venv/bin:$PATH"
cd labextension
say "Type checks and formatting"
jlpm typecheck
jlpm format:check

# 2. Unit tests of the state logic.
say "jest"
jlpm test

# 3. Build the extension and install it into .venv (an editable install copies it there).
say "Building the extension (jlpm build:prod) and installing it"
jlpm build:prod
(cd "$repo" && .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .)
jupyter labextension list 2>&1 | grep -E '^\s+kernelhib .*enabled.*OK' ||
    { echo "test-ui.sh: the kernelhib extension is not installed and enabled" >&2; exit 1; }

# 4. The browser test.
export CHROMIUM=/usr/bin/chromium KERNELHIB_JUPYTER="$repo/.venv/bin/jupyter"
if ((screenshots)); then
    export KERNELHIB_SCREENSHOTS="$repo/docs/images"
    mkdir -p "$KERNELHIB_SCREENSHOTS"
fi
say "Playwright in Chromium against a real JupyterLab"
jlpm test:ui
