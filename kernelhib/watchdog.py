"""``python -m kernelhib.watchdog IMAGE_DIR SERVER_ID``: clean up once its server is gone.

Each server starts one, with a pipe on its standard input that only the server
holds. The pipe closes when the server exits, however it exits (SIGKILL too);
the watchdog then ends the kernels the server left running and continues those
it left mid-hibernation (see :mod:`kernelhib.recovery`). Kernels do not die with
their server by themselves any more: one being dumped must not.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .image_store import ImageStore
from .recovery import boot_ticks, recover

LOG_FILE = "watchdog.log"


def main(argv: list[str]) -> int:
    root, owner = Path(argv[0]), argv[1]
    sys.stdin.buffer.read()  # returns once every writer is gone: the server has exited
    started_before = boot_ticks()
    store = ImageStore(root)
    mine = [entry for entry in store.journal.entries() if entry.server == owner]
    if mine:  # then the journal's directory exists
        logging.basicConfig(
            filename=store.journal.directory / LOG_FILE,
            level=logging.INFO,
            format=f"%(asctime)s watchdog of server {owner}: %(message)s",
        )
        recover(store.journal, store.has_image, mine, started_before)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
