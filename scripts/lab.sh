#!/usr/bin/env bash
# Start JupyterLab with kernelhib (its server extension and its JupyterLab extension) and
# the demo notebook (notebooks/), on loopback. Runs scripts/setup.sh first (adding
# JupyterLab and numpy to .venv; it needs no Node.js, and fails if the JupyterLab extension
# is not enabled). Needs root.
#
#   bash scripts/lab.sh                     # http://127.0.0.1:8888/lab?token=...
#   JUPYTER_PORT=9999 bash scripts/lab.sh   # another port
#   JUPYTER_TOKEN=secret bash scripts/lab.sh  # a token of your choice (default: random)
#
# Extra arguments go to `jupyter lab`. Stop it with Ctrl-C.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
say() { printf '==> %s\n' "$*"; }

bash scripts/setup.sh --no-test --lab

port="${JUPYTER_PORT:-8888}"
args=(--no-browser --ServerApp.ip=127.0.0.1 "--ServerApp.port=$port"
    "--ServerApp.root_dir=$repo/notebooks")
[[ "$(id -u)" == 0 ]] && args+=(--allow-root)

say "Starting JupyterLab with kernelhib: jupyter lab ${args[*]} $*"
.venv/bin/jupyter-lab "${args[@]}" "$@" &
lab_pid=$!
trap 'kill -TERM "$lab_pid" 2>/dev/null || true; wait "$lab_pid" || true; exit 130' INT TERM

# Wait until the server is up, then print its URL with its token (it writes both,
# and the port it really got, into its runtime file).
url="$(.venv/bin/python - "$lab_pid" <<'PY'
import sys, time, urllib.request
from pathlib import Path
from jupyter_server.serverapp import list_running_servers

pid = int(sys.argv[1])
stat = Path(f"/proc/{pid}/stat")
for _ in range(1200):
    try:
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            sys.exit(1)  # it exited
    except OSError:
        sys.exit(1)
    for info in list_running_servers():
        if info["pid"] == pid:
            base = info["url"].rstrip("/")
            try:
                urllib.request.urlopen(f"{base}/api/status?token={info['token']}", timeout=5)
            except OSError:
                break
            print(f"{base}/lab/tree/demo.ipynb?token={info['token']}")
            sys.exit(0)
    time.sleep(0.1)
sys.exit(1)
PY
)" || {
    kill -TERM "$lab_pid" 2>/dev/null || true
    echo "lab.sh: JupyterLab did not come up; see its log above" >&2
    exit 1
}
printf '\n==> JupyterLab with kernelhib is running. Open the demo notebook at:\n\n    %s\n\n' "$url"
printf '    Hibernate a notebook'\''s kernel with the moon button at the right of its toolbar, or\n'
printf '    from a cell: %%load_ext kernelhib, then %%hibernate. Running a cell wakes it.\n'
printf '    Stop with Ctrl-C.\n\n'
wait "$lab_pid"
