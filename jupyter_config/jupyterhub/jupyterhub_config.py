# JupyterHub with kernelhib, on one machine (local processes).
#
#   jupyterhub -f jupyter_config/jupyterhub/jupyterhub_config.py
#
# Kernels that sit idle for KERNEL_IDLE_TIMEOUT hibernate to disk (their memory
# goes back to the machine); servers idle for SERVER_IDLE_TIMEOUT are stopped by
# jupyterhub-idle-culler, and stopping a server hibernates the kernels still
# running in it. When the user comes back, the hub starts the server again and
# its kernels wake, with their state, at the first cell the user runs.
#
# Run the hub as root, with JupyterHub, jupyterhub-idle-culler and kernelhib in
# the same Python environment (sys.executable's), configurable-http-proxy on
# PATH (or ConfigurableHTTPProxy.command), and CRIU installed with
#
#   kernelhib install-criu --prefix /opt/kernelhib-criu
#
# Every user server runs as root (CRIU restores kernels as root here), so every
# user can read every other user's files and images: this configuration is for
# one person or a team that trusts each other, not for strangers. For servers
# that run as their users, with CRIU, see jupyterhub_config_criud.py. See
# docs/jupyterhub.md for the trade-offs, and for Kubernetes (z2jh-values.yaml).
#
# tests/test_jupyterhub.py runs a real hub with this file, with shorter timings,
# loopback ports, a temporary home and a dummy authenticator.

import os
import sys
from pathlib import Path

c = get_config()  # noqa: F821

# Timings, in seconds. A kernel idle this long hibernates, a server idle this
# long is stopped. Keep the server's timeout well above the kernels': the culler
# sees only whole servers (their last activity), never kernels.
KERNEL_IDLE_TIMEOUT = 20 * 60
SERVER_IDLE_TIMEOUT = 60 * 60
CULL_EVERY = 5 * 60

# The CRIU that `kernelhib install-criu --prefix /opt/kernelhib-criu` installed.
# Named explicitly because user servers run with HOME set to the user's home,
# where kernelhib's default install location (root's Jupyter data dir) is not.
CRIU_PATH = "/opt/kernelhib-criu/bin/criu"

bin_dir = Path(sys.executable).parent

# --- Who logs in --------------------------------------------------------------
# The default authenticator is PAM (system accounts). Name the allowed users, or
# configure another authenticator (OAuth, LDAP, ...).
# c.Authenticator.allowed_users = {"ada", "grace"}
# c.Authenticator.admin_users = {"ada"}

# --- User servers --------------------------------------------------------------
# SimpleLocalProcessSpawner runs every server as the hub's user (root), in its own
# home directory. LocalProcessSpawner (the default) runs each server as the user's
# system account: CRIU then needs kernelhib-criud (jupyterhub_config_criud.py),
# else use the dill engine (c.KernelHibernator.engine = "dill"); see docs/jupyterhub.md.
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "/srv/jupyterhub/home/{username}"

c.Spawner.cmd = [str(bin_dir / "jupyterhub-singleuser")]
c.Spawner.args = [
    "--allow-root",
    # Idle kernels hibernate; checked every minute.
    f"--KernelHibernator.idle_timeout={KERNEL_IDLE_TIMEOUT}",
    "--KernelHibernator.check_interval=60",
    f"--KernelHibernator.criu_path={CRIU_PATH}",
    # On stop (SIGINT/SIGTERM from the hub), hibernate the kernels still running,
    # for at most 60 s. These are kernelhib's defaults, repeated here because the
    # spawner's grace periods below are sized from them.
    "--KernelHibernator.hibernate_on_stop=True",
    "--KernelHibernator.stop_timeout=60",
    # Images live under <home>/.local/share/jupyter/kernelhib/images, the default:
    # one image_dir per user, which the user's next server re-adopts.
]
c.Spawner.environment = {
    # Kernels and terminals find this environment's tools first.
    "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "/usr/bin:/bin")]),
}

# Stopping a server: the spawner sends SIGINT, waits interrupt_timeout seconds,
# then SIGTERM, then SIGKILL. kernelhib hibernates kernels on SIGINT, so give it
# more than stop_timeout (60 s) before the SIGTERM, and the SIGTERM a margin too.
c.LocalProcessSpawner.interrupt_timeout = 90
c.LocalProcessSpawner.term_timeout = 30

# --- Stopping idle servers -----------------------------------------------------
# jupyterhub-idle-culler, run by the hub as a service, with only the permissions
# it needs. It stops servers; it never deletes users (no --cull-users), whose
# homes hold the images.
c.JupyterHub.services = [
    {
        "name": "idle-culler",
        "command": [
            sys.executable,
            "-m",
            "jupyterhub_idle_culler",
            f"--timeout={SERVER_IDLE_TIMEOUT}",
            f"--cull-every={CULL_EVERY}",
        ],
    }
]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    }
]
