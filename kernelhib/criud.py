"""kernelhib-criud: CRIU hibernation for Jupyter servers that run as their users.

CRIU restores processes only as root. This small root service does the root
part for each user's server, and only for that user (docs/security.md has the
threat model):

- It listens on a unix socket anyone may connect to. Who asks is the uid the
  kernel reports for the connection (``SO_PEERCRED``), never anything the
  request says.
- ``launch`` starts a kernel as the asking uid (its groups, no capabilities) as
  pid 1 of a new pid namespace, which a restore needs. ``dump`` takes only a
  kernel it launched or restored for that same uid, still the same process
  (its start time), still wholly that uid's.
- Images go to ``<store>/<uid>/``, an image store of the uid's own, root's and
  mode 0700, signed with that store's key: no user can read, plant or alter
  one, and one uid's image does not verify in another's store. An image that
  CRIU would restore by creating or unlinking files as root (deleted files,
  unix sockets bound to a path) is refused.
- ``restore`` restores only an image of the asking uid's store that verifies,
  left stopped; before it runs, every thread must have exactly that uid, its
  gid, groups it still has and no capabilities, and every file it holds or
  maps (CRIU opened them by path, as root) must be one the uid may open so, as
  the kernel checks for the uid itself. Otherwise it is killed.

Run as ``kernelhib-criud`` or ``python -m kernelhib.criud`` (``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import pwd
import quopri
import re
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engines.base import EngineError
from .engines.criu import CriuEngine, _CliDriver, _import_pycriu
from .engines.criu_install import locate_criu
from .engines.criu_service import MAX_REQUEST, Refusal, ServiceError
from .image_store import ImageError, ImageStore
from .kernel_process import KernelProcess, namespace_init, proc_fields, process_start, process_tree
from .paths import private_dir

log = logging.getLogger("kernelhib.criud")

DEFAULT_SOCKET = "/run/kernelhib/criud.sock"
DEFAULT_STORE = "/var/lib/kernelhib/criud"
# Each uid's images stay on root's disk: a bound on what one user may fill it with.
DEFAULT_MAX_IMAGES = 64
# Root's own programs run with this PATH and nothing else of the asker's environment.
_SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Run as the user, after the drop: the kernel's output goes to the log the user
# named, opened with the user's rights; stdin is /dev/null.
_REDIRECT = 'log=$1; shift; exec "$@" </dev/null >>"$log" 2>&1'
# Pid 1 of each kernel's namespace: it waits for the kernel. It has the user's
# uid and CAP_SYS_ADMIN alone, for CRIU's parasite to mount the namespace's /proc
# from it, in its working directory: one of the user's that the user cannot
# reach, <store>/.init/<uid>. With a capability the user lacks, it cannot be
# traced, nor its files or memory read, by the user's processes.
_INIT = '"$@" & wait $!'
_INIT_CAPS = "-all,+sys_admin"
_INIT_CAP_MASK = 1 << 21  # CAP_SYS_ADMIN
# CRIU dumps as the kernel's uid (root without CAP_SYS_RESOURCE cannot read the
# rlimits of another uid's processes), with what a dump needs: seize and trace
# them (the init has a capability the user lacks), read their maps' files.
_DUMP_CAPS = "-all,+checkpoint_restore,+sys_ptrace,+dac_read_search"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_ARGS = 4096
_SYS_SETGROUPS = 116  # x86_64; per thread, unlike libc's setgroups


@dataclass
class Kernel:
    """A kernel this service launched or restored, and for whom.

    Start times (:func:`process_start`) tell a reused pid from the process.
    """

    uid: int
    init: int  # host pid of its namespace's init: the root of what CRIU dumps
    init_start: int
    pid: int  # host pid of the kernel
    start: int

    def alive(self) -> bool:
        """Whether both processes are still the ones launched or restored."""
        return process_start(self.init) == self.init_start and process_start(self.pid) == self.start


@dataclass(frozen=True)
class User:
    """Whom a request is for: the peer's uid, as its account says now."""

    uid: int
    gid: int
    name: str
    groups: frozenset[int]

    @classmethod
    def of(cls, uid: int) -> User:
        try:
            account = pwd.getpwuid(uid)
        except KeyError:
            raise ServiceError(f"uid {uid} has no account", Refusal.NOT_YOURS) from None
        groups = frozenset(os.getgrouplist(account.pw_name, account.pw_gid))
        return cls(uid, account.pw_gid, account.pw_name, groups)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end, as the kernel recorded it at connect."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def users_processes(init: int) -> list[int]:
    """The processes of a kernel's namespace but its init: the kernel, what it started,
    and orphans the init adopted. All must be the user's."""
    return process_tree(init)[1:]


def credentials_problem(pids: list[int], user: User) -> str:
    """Why one of ``pids`` is not wholly ``user``'s, unprivileged; '' if none.

    Every thread of every process: credentials are per thread.
    """
    try:
        for process in pids:
            for task in Path(f"/proc/{process}/task").iterdir():
                fields = proc_fields(task / "status")
                uids = {int(u) for u in fields["Uid"].split()}
                gids = {int(g) for g in fields["Gid"].split()}
                groups = {int(g) for g in fields["Groups"].split()}
                if uids != {user.uid} or gids != {user.gid}:
                    return f"process {process} runs as uids {uids}, gids {gids}"
                if not groups <= user.groups:
                    return f"process {process} has groups {groups - user.groups} of another"
                for caps in ("CapPrm", "CapEff", "CapAmb"):
                    if int(fields[caps], 16):
                        return f"process {process} has capabilities ({caps} {fields[caps]})"
    except (OSError, KeyError, ValueError) as exc:
        return f"cannot read the credentials of processes {pids}: {exc}"
    return ""


def _held_files(pids: list[int]) -> Iterator[tuple[str, str, int]]:
    """What each process holds by path: (what, path of it in /proc, open flags).

    Open files (sockets, pipes and anonymous inodes have no path), memory
    mappings of files (shared writable ones need write access), working and
    root directories (flags -1: search access).
    """
    for process in pids:
        proc = Path(f"/proc/{process}")
        for fd in (proc / "fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("/"):
                flags = proc_fields(proc / "fdinfo" / fd.name)["flags"]
                yield f"{target} (fd {fd.name} of {process})", str(fd), int(flags, 8)
        for line in (proc / "maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if fields[4] == "0":
                continue
            perms, path = fields[1], fields[5] if len(fields) > 5 else "?"
            flags = os.O_RDWR if perms[1] == "w" and perms[3] == "s" else os.O_RDONLY
            yield f"{path} (mapped by {process})", str(proc / "map_files" / fields[0]), flags
        yield f"the working directory of {process}", str(proc / "cwd"), -1
        yield f"the root directory of {process}", str(proc / "root"), -1


def _as_user(user: User, work: Callable[[], str]) -> str:
    """Run ``work`` in a thread of its own whose file access is ``user``'s: fsuid, fsgid
    and groups are per thread, and a non-root fsuid drops the capabilities that
    bypass file permissions. The thread ends with those credentials."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[str] = []

    def run() -> None:
        groups = (ctypes.c_uint * len(user.groups))(*sorted(user.groups))
        if libc.syscall(_SYS_SETGROUPS, len(user.groups), groups) != 0:
            result.append(f"setgroups failed: {os.strerror(ctypes.get_errno())}")
            return
        libc.setfsgid(user.gid)
        libc.setfsuid(user.uid)
        if libc.setfsuid(-1) != user.uid:  # it answers the current one
            result.append("setfsuid failed")
            return
        result.append(work())

    thread = threading.Thread(target=run, name=f"access-check-{user.uid}")
    thread.start()
    thread.join()
    return result[0] if result else "the access check failed"


def access_problem(pids: list[int], user: User) -> str:
    """Which file held by ``pids`` ``user`` could not open the same way; '' if none.

    CRIU reopens a kernel's files by their path, as root: a path the user
    replaced meanwhile (a link to /etc/shadow) would hand root's file to the
    user's kernel. Each file is checked as it is, through the kernel's own
    reference (a magic link), for the user: its permissions, not its path.
    """
    held: list[tuple[str, int, int]] = []
    try:
        for what, link, flags in _held_files(pids):
            with contextlib.suppress(FileNotFoundError):  # a race with nothing to check
                held.append((what, os.open(link, os.O_PATH), flags))
    except OSError as exc:
        for _, fd, _ in held:
            os.close(fd)
        return f"cannot list the files of processes {pids}: {exc}"

    def check() -> str:
        for what, fd, flags in held:
            try:
                if flags == -1:  # a directory one works in: search permission
                    os.close(os.open(".", os.O_PATH | os.O_DIRECTORY, dir_fd=fd))
                    continue
                mode = os.fstat(fd).st_mode
                access = flags & os.O_ACCMODE
                if stat.S_ISFIFO(mode) and access != os.O_RDONLY:
                    access = os.O_RDWR  # opening one for writing alone would wait
                if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
                    access |= os.O_NONBLOCK | os.O_NOCTTY
                os.close(os.open(f"/proc/self/fd/{fd}", access))
            except OSError as exc:
                return f"{what}: the user may not open it so ({exc.strerror})"
        return ""

    try:
        return _as_user(user, check)
    finally:
        for _, fd, _ in held:
            os.close(fd)


def image_problem(image_dir: Path, pycriu: Any) -> str:
    """What in a CRIU image CRIU would restore by writing the filesystem as root; ''
    if nothing.

    Deleted files are recreated (ghost files, link remaps) and unix sockets
    bound to a path are bound again, at paths under the user's control.
    """
    for name in ("remap-fpath.img", "files.img"):
        path = image_dir / name
        if not path.is_file():
            continue
        with path.open("rb") as f:
            entries = pycriu.images.load(f)["entries"]
        if name == "remap-fpath.img" and entries:
            return "the kernel holds deleted files open, which CRIU would recreate as root"
        for entry in entries:
            # pycriu gives a unix socket's name quoted-printable; an abstract one starts with NUL.
            bound = entry.get("usk", {}).get("name") if entry.get("type") == "UNIXSK" else None
            if bound and not quopri.decodestring(bound).startswith(b"\0"):
                return "the kernel has a unix socket bound to a path, which CRIU binds as root"
    if any(image_dir.glob("ghost-file-*.img")):
        return "the kernel holds deleted files open, which CRIU would recreate as root"
    return ""


def _continue(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def _ns_pid(pid: int) -> int:
    """The pid of a process in its own pid namespace."""
    return int(proc_fields(Path(f"/proc/{pid}/status"))["NSpid"].split()[-1])


class Service:
    """The service's state: the kernels it launched or restored, each uid's image store."""

    def __init__(self, store_root: Path, criu_path: str = "", max_images: int = 64) -> None:
        self.root = private_dir(store_root)
        binary = locate_criu(criu_path)
        self.criu = _CliDriver(binary)
        self.pycriu = _import_pycriu(binary)
        if self.pycriu is None:
            raise SystemExit("kernelhib-criud needs pycriu (installed with CRIU) to check images")
        self.max_images = max_images
        self.kernels: dict[int, Kernel] = {}
        self._stores: dict[int, ImageStore] = {}
        self._tools = {}
        for tool in ("unshare", "setpriv", "env", "sh", "setsid"):
            found = shutil.which(tool, path=_SAFE_PATH)
            if found is None:
                raise SystemExit(f"kernelhib-criud needs {tool} (util-linux, coreutils)")
            self._tools[tool] = found
        # One dump at a time: each mounts a /proc in its init's directory.
        self._dump_lock = asyncio.Lock()
        self._background: set[asyncio.Future[Any]] = set()
        self.ops: dict[str, Callable[[User, dict[str, Any]], Any]] = {
            "hello": self.hello,
            "launch": self.launch,
            "dump": self.dump,
            "restore": self.restore,
            "discard": self.discard,
        }

    def store(self, uid: int) -> ImageStore:
        """The uid's own store: root's, 0700, its own key."""
        if uid not in self._stores:
            self._stores[uid] = ImageStore(self.root / str(uid))
        return self._stores[uid]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, one answer; the asker is who the kernel says it is."""
        uid = peer_uid(writer.get_extra_info("socket"))
        op = "?"
        try:
            try:
                request = json.loads(await reader.readuntil(b"\n"))
            except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
                raise ServiceError(f"not one JSON line of at most {MAX_REQUEST} bytes: {exc}",
                                   Refusal.BAD_REQUEST) from None  # fmt: skip
            op = request.get("op") if isinstance(request, dict) else None
            if op not in self.ops:
                raise ServiceError(f"unknown operation {str(op)[:20]!r}", Refusal.BAD_REQUEST)
            user = await asyncio.to_thread(User.of, uid)
            answer = {"ok": True, **await self.ops[op](user, request)}
        except ServiceError as exc:
            log.warning("uid %d: %s refused (%s): %s", uid, op, exc.reason.value, exc)
            answer = {"ok": False, "reason": exc.reason.value, "error": str(exc)}
        except Exception as exc:  # the asker gets an answer, whatever failed
            log.error("uid %d: %s failed: %s", uid, op, exc, exc_info=not isinstance(
                exc, (EngineError, ImageError, OSError, RuntimeError)))  # fmt: skip
            answer = {"ok": False, "reason": Refusal.FAILED.value, "error": str(exc)}
        with contextlib.suppress(OSError):
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
            writer.close()

    async def hello(self, user: User, request: dict[str, Any]) -> dict[str, Any]:
        return {"uid": user.uid}

    async def launch(self, user: User, request: dict[str, Any]) -> dict[str, Any]:
        """Start a kernel as ``user`` in a pid namespace of its own; answer its host pid.

        Root runs only unshare, setsid, the namespace's init and setpriv, with a
        fixed environment; the asker's command, environment, directory and log
        come into play after the drop to the user's credentials.
        """
        argv, env = request.get("argv"), request.get("env")
        cwd, log_file = request.get("cwd"), request.get("log")
        if not (isinstance(argv, list) and 0 < len(argv) <= _MAX_ARGS
                and all(isinstance(a, str) and "\0" not in a for a in argv)):  # fmt: skip
            raise ServiceError("argv must be a non-empty list of strings", Refusal.BAD_REQUEST)
        if not (isinstance(env, dict) and all(
            isinstance(k, str) and _ENV_NAME.match(k) and isinstance(v, str) and "\0" not in v
            for k, v in env.items()
        )):  # fmt: skip
            raise ServiceError("env must map variable names to strings", Refusal.BAD_REQUEST)
        for name, path in (("cwd", cwd), ("log", log_file)):
            if not (isinstance(path, str) and path.startswith("/") and "\0" not in path):
                raise ServiceError(f"{name} must be an absolute path", Refusal.BAD_REQUEST)
        tools = self._tools
        cmd = [
            tools["unshare"], "--pid", "--fork", "--kill-child",
            tools["setsid"], *self._as(user, _INIT_CAPS), tools["sh"], "-c", _INIT, "init",
            tools["setpriv"], "--inh-caps=-all", "--ambient-caps=-all", "--",
            tools["env"], "-i", f"--chdir={cwd}", "--", *(f"{k}={v}" for k, v in env.items()),
            tools["sh"], "-c", _REDIRECT, "sh", log_file, tools["setsid"], *argv,
        ]  # fmt: skip
        unshare = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,  # the init holds nothing of root's
            env={"PATH": _SAFE_PATH},
            cwd=await asyncio.to_thread(self._init_dir, user),
            start_new_session=True,
        )
        init = await namespace_init(unshare.pid, lambda: unshare.returncode)
        pid = await namespace_init(init, lambda: unshare.returncode)
        kernel = self._register(user, init, pid)
        self._later(self._forget_when_done(kernel, unshare.wait()))
        log.info("uid %d: launched kernel %d", user.uid, pid)
        return {"pid": pid}

    def _as(self, user: User, caps: str) -> list[str]:
        """A command prefix that runs a program as ``user``, with the capabilities ``caps``."""
        groups = ",".join(str(g) for g in sorted(user.groups))
        return [
            self._tools["setpriv"], f"--reuid={user.uid}", f"--regid={user.gid}",
            f"--groups={groups}" if groups else "--clear-groups",
            f"--inh-caps={caps}", f"--ambient-caps={caps}", "--",
        ]  # fmt: skip

    def _init_dir(self, user: User) -> Path:
        """The working directory of ``user``'s inits: theirs, in a directory of root's."""
        path = private_dir(self.root / ".init") / str(user.uid)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
        return path

    def _register(self, user: User, init: int, pid: int) -> Kernel:
        kernel = Kernel(user.uid, init, process_start(init), pid, process_start(pid))
        self.kernels[pid] = kernel
        return kernel

    async def _forget_when_done(self, kernel: Kernel, ended: Any) -> None:
        await ended
        if self.kernels.get(kernel.pid) is kernel:
            del self.kernels[kernel.pid]

    def _later(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _own_kernel(self, user: User, pid: Any) -> Kernel:
        """The kernel ``pid`` if this service started it for ``user`` and it is still it."""
        kernel = self.kernels.get(pid) if isinstance(pid, int) else None
        if kernel is None or kernel.uid != user.uid or not kernel.alive():
            raise ServiceError(
                f"process {pid} is no kernel kernelhib-criud started for uid {user.uid}",
                Refusal.NOT_YOURS,
            )
        return kernel

    async def dump(self, user: User, request: dict[str, Any]) -> dict[str, Any]:
        """Dump one of ``user``'s kernels into their store, leaving it stopped; answer the
        image's name."""
        kernel = self._own_kernel(user, request.get("pid"))
        store = self.store(user.uid)
        if problem := await asyncio.to_thread(self._namespace_problem, kernel.init, user):
            raise ServiceError(problem, Refusal.CHECK_FAILED)
        if len(await asyncio.to_thread(store.kernel_ids)) >= self.max_images:
            raise ServiceError(
                f"uid {user.uid} has {self.max_images} images already: wake or shut down "
                "hibernated kernels first",
                Refusal.LIMIT,
            )
        image = uuid.uuid4().hex
        staging = await asyncio.to_thread(store.stage, image, CriuEngine.is_bulk)
        try:
            async with self._dump_lock:
                await asyncio.to_thread(self._dump, kernel, user, staging)
            # Stopped now. Still the same processes (a pid reused meanwhile would have
            # another start time), still wholly the user's, nothing CRIU would write.
            problem = (
                "the kernel ended during the dump"
                if not kernel.alive()
                else self._namespace_problem(kernel.init, user)
                or image_problem(staging, self.pycriu)
            )
            if problem:
                raise ServiceError(problem, Refusal.CHECK_FAILED)
            meta = {"engine": "criu", "uid": user.uid, "ns_pid": _ns_pid(kernel.pid)}
            committed = await asyncio.to_thread(store.commit, staging, image, meta)
        except BaseException:
            await asyncio.to_thread(store.discard, staging)
            raise
        log.info("uid %d: dumped kernel %d into %s", user.uid, kernel.pid, image)
        return {"image": image, "bytes": committed.bytes}

    def _dump(self, kernel: Kernel, user: User, staging: Path) -> None:
        """CRIU's dump of the kernel's namespace, as the user, into ``staging``: theirs while
        CRIU writes it (in root's directory: out of their reach), root's afterwards."""
        with contextlib.suppress(OSError):  # left by an interrupted dump
            (self._init_dir(user) / "proc.crtools").rmdir()
        os.chown(staging, user.uid, user.gid)
        try:
            self.criu.dump(kernel.init, staging, self._as(user, _DUMP_CAPS))
        finally:
            # The init waits on: the client resumes or ends the kernel, which it can signal.
            _continue(kernel.init)
            for path in [staging, *staging.rglob("*")]:
                os.chown(path, 0, 0, follow_symlinks=False)

    def _namespace_problem(self, init: int, user: User) -> str:
        """Why the namespace of ``init`` is not one this service would have launched for
        ``user``: its init running our init with CAP_SYS_ADMIN alone, everything else
        wholly the user's with no capabilities. '' if it is."""
        try:
            exe = os.readlink(f"/proc/{init}/exe")
            fields = proc_fields(Path(f"/proc/{init}/status"))
        except OSError as exc:
            return f"cannot inspect the namespace's init: {exc}"
        if exe != os.path.realpath(self._tools["sh"]):
            return f"its init runs {exe}, not {self._tools['sh']}"
        if any(int(fields[caps], 16) != _INIT_CAP_MASK for caps in ("CapPrm", "CapEff")):
            return f"its init has capabilities {fields['CapEff']}, not CAP_SYS_ADMIN alone"
        if {int(u) for u in fields["Uid"].split()} != {user.uid}:
            return f"its init runs as uids {fields['Uid']}"
        return credentials_problem(users_processes(init), user)

    async def restore(self, user: User, request: dict[str, Any]) -> dict[str, Any]:
        """Restore an image of ``user``'s store, checked, stopped; answer the kernel's pid."""
        store = self.store(user.uid)
        name = request.get("image")
        try:
            image = await asyncio.to_thread(store.read, name if isinstance(name, str) else "")
        except ImageError as exc:
            raise ServiceError(str(exc), Refusal.NOT_YOURS) from None
        try:
            await asyncio.to_thread(store.authenticate, image)
        except ImageError as exc:
            raise ServiceError(str(exc), Refusal.CHECK_FAILED) from None
        if image.manifest.get("uid") != user.uid:
            raise ServiceError(f"image {name} is not uid {user.uid}'s", Refusal.CHECK_FAILED)
        if problem := image_problem(image.path, self.pycriu):
            raise ServiceError(problem, Refusal.CHECK_FAILED)
        linked = await asyncio.to_thread(store.restore_dir, image)
        try:
            init = await asyncio.to_thread(self.criu.restore, linked)
        finally:
            await asyncio.to_thread(store.discard, linked)
        process = KernelProcess(init)  # our child: reaped here
        try:
            pid = await asyncio.to_thread(self._check_restored, init, user, image.manifest)
        except BaseException:  # whatever failed, nothing unchecked runs
            process.send_signal(signal.SIGKILL)  # pid 1 of its namespace: all of it ends
            await process.wait()
            raise
        kernel = self._register(user, init, pid)
        _continue(init)
        self._later(self._forget_when_done(kernel, process.wait()))
        log.info("uid %d: restored kernel %d from %s", user.uid, pid, name)
        return {"pid": pid}

    def _check_restored(self, init: int, user: User, manifest: dict[str, Any]) -> int:
        """The restored kernel's host pid, once its namespace is checked; blocking.

        The init must be ours, everything else wholly the user's, holding only
        files the user may open.
        """
        pids = users_processes(init)
        kernel = next((p for p in pids if _ns_pid(p) == manifest.get("ns_pid")), None)
        problem = self._namespace_problem(init, user) or access_problem([init, *pids], user)
        if problem or kernel is None:
            problem = problem or "it holds no kernel"
            raise ServiceError(f"the restored kernel was killed: {problem}", Refusal.CHECK_FAILED)
        return kernel

    async def discard(self, user: User, request: dict[str, Any]) -> dict[str, Any]:
        """Delete an image of ``user``'s store."""
        store = self.store(user.uid)
        name = request.get("image")
        try:
            store.path(name if isinstance(name, str) else "")
        except ImageError as exc:
            raise ServiceError(str(exc), Refusal.BAD_REQUEST) from None
        await asyncio.to_thread(store.discard, name)
        return {}


async def serve(service: Service, path: Path) -> None:
    """Listen on ``path`` (mode 0666: who asks is checked per connection) until stopped."""
    private_dir(path.parent)
    os.chmod(path.parent, 0o755)
    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(service.handle, str(path), limit=MAX_REQUEST)
    os.chmod(path, 0o666)
    log.info("kernelhib-criud listening on %s, images in %s", path, service.root)
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set_result, None)
    async with server:
        await stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kernelhib-criud", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="unix socket to listen on")
    parser.add_argument("--store", default=DEFAULT_STORE, help="where images are kept, per uid")
    parser.add_argument("--criu-path", default="", help="the criu binary (default: as the server)")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                        help="images kept at most per uid")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        parser.error("kernelhib-criud runs as root: it restores other users' kernels")
    os.umask(0o077)
    service = Service(Path(args.store), args.criu_path, args.max_images)
    asyncio.run(serve(service, Path(args.socket)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
