# JupyterHub with kernelhib on one machine, every user's server running as the
# user's own system account, with CRIU hibernation through kernelhib-criud.
#
#   jupyterhub -f jupyter_config/jupyterhub/jupyterhub_config_criud.py
#
# Everything else is as in jupyterhub_config.py (loaded below): timings, the
# culler, the stop grace periods. What differs:
#
# - LocalProcessSpawner (JupyterHub's default): each server runs as its user, in
#   the user's home; users cannot read each other's files, kernels or images.
# - The root service kernelhib-criud launches, dumps and restores the users'
#   kernels, each for its own user only, and keeps their images where no user can
#   read or write them. Install and start it first:
#
#     kernelhib install-criu --prefix /opt/kernelhib-criu
#     cp jupyter_config/systemd/kernelhib-criud.service /etc/systemd/system/
#     systemctl daemon-reload && systemctl enable --now kernelhib-criud
#
# See docs/jupyterhub.md and, for what the service guarantees, docs/security.md.

from pathlib import Path

c = get_config()  # noqa: F821
load_subconfig(str(Path(__file__).with_name("jupyterhub_config.py")))  # noqa: F821

CRIU_SERVICE = "/run/kernelhib/criud.sock"

c.JupyterHub.spawner_class = "localprocess"
c.Spawner.args = [
    arg
    for arg in c.Spawner.args
    # Servers do not run as root, and CRIU runs in the service, not in them.
    if not arg.startswith(("--allow-root", "--KernelHibernator.criu_path"))
] + [f"--CriuService.socket={CRIU_SERVICE}"]
