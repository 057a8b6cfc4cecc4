"""Holds a lazily woken kernel's userfaultfds for as long as the server might die.

Run as a script (``python -I -S uffd_holder.py FD``) by the lazy wake's page
server, which sends it each userfaultfd it gets, over the socket ``FD``. Linux
lets go of a task's lazy memory only when the last descriptor of its
userfaultfd closes, and then fills every page not yet copied with zeros. Were
the server the only holder, its death would leave the kernel running on zeros
where its data was. With this process holding them too, the kernel waits on its
next missing page instead, until recovery ends it (kernel first, this process
last: it carries ``KERNELHIB_HELPER``).

The server sends ``b"r"`` once the kernel has all its memory, or is dead: then
this exits. Hung up without it, the server is gone: this holds on until killed.
"""

import signal
import socket
import sys


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # only SIGKILL, after the kernel's end
    sock = socket.socket(fileno=int(sys.argv[1]))
    held: list[int] = []
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 1, 64)
        held += fds
        if data == b"r":
            return
        if not data:
            while True:
                signal.pause()


if __name__ == "__main__":
    main()
