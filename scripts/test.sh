#!/usr/bin/env bash
# Set kernelhib up (scripts/setup.sh, with the test extras), lint it, and run the
# whole test suite against a real CRIU, the JupyterLab extension's tests, and the
# installs without Node.js (wheel, Quick Start). Needs root. Extra arguments go to pytest:
#
#   bash scripts/test.sh
#   bash scripts/test.sh -k hibernate -x
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
say() { printf '==> %s\n' "$*"; }

bash scripts/setup.sh

paths=()
for path in kernelhib tests benchmarks; do
    [[ -e "$path" ]] && paths+=("$path") # benchmarks/ may not exist in a checkout yet
done
say "ruff check ${paths[*]}"
.venv/bin/ruff check "${paths[@]}"
say "ruff format --check ${paths[*]}"
.venv/bin/ruff format --check "${paths[@]}"

# A missing or broken CRIU fails the CRIU tests instead of skipping them.
say "KERNELHIB_REQUIRE_CRIU=1 pytest $*"
KERNELHIB_REQUIRE_CRIU=1 .venv/bin/pytest "$@"

# The JupyterLab extension: jest, then the browser test in Debian's Chromium.
say "JupyterLab extension: bash scripts/test-ui.sh"
bash scripts/test-ui.sh

# The wheel and the Quick Start on a machine without Node.js (Node hidden), toolbar in Chromium.
say "Installs without Node.js: bash scripts/test-install.sh"
bash scripts/test-install.sh
