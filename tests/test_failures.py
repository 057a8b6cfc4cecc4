"""Nothing is lost: a failure at any step of hibernation leaves the kernel running
with its state; a failed wake keeps the image; bad requests get clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kernelhib import image_store
from kernelhib.engines.base import EngineError
from kernelhib.engines.criu import CriuEngine
from kernelhib.hibernator import KernelHibernator
from kernelhib.image_store import ImageStore
from kernelhib.journal import Journal

from .conftest import TRACE_A_CHILD, image_path, wait_for_state

pytestmark = pytest.mark.criu

# These tests are about the CRIU protocol: with "auto", CRIU failures fall back to dill.
CRIU = {"engine": "criu"}


def fail(message: str):
    def _raise(*args: Any, **kwargs: Any) -> Any:
        raise OSError(message)

    return _raise


async def fail_dump(self: Any, pid: int, image_dir: Path, sink: Any = None) -> None:
    raise EngineError("injected: criu dump failed")


async def fail_end(self: Any, km: Any, graceful: bool = False) -> None:
    raise OSError("injected: could not end the kernel")


def fail_after_first_hash() -> Any:
    real, calls = image_store.digest, []

    def digest(path: Path, **options: Any) -> str:
        calls.append(path)
        if len(calls) > 1:
            raise OSError("injected: I/O error while hashing the image")
        return real(path, **options)

    return digest


FAULTS = {
    "record it in the journal": (Journal, "write", fail("injected: disk full")),
    "create staging directory": (ImageStore, "stage", fail("injected: disk full")),
    "freeze and dump": (CriuEngine, "dump", fail_dump),
    "verify and fsync image": (image_store, "digest", None),
    "sign manifest": (ImageStore, "_sign", fail("injected: cannot sign")),
    "end the process": (KernelHibernator, "_end_process", fail_end),
}


def image_root_is_clean(jp_serverapp: Any) -> bool:
    """No image, no partial one, no chunk of one: only the store's own files (the key,
    the journal, the chunk store's lock) are left."""
    root = Path(jp_serverapp.kernel_manager.hibernator.image_dir)
    chunks = [p for p in (root / ".chunks").rglob("*") if p.is_file() and p.name != "lock"]
    own = (".journal", ".chunks")
    return not chunks and not [p for p in root.iterdir() if p.is_dir() and p.name not in own]


@pytest.mark.parametrize("step", FAULTS)
async def test_failure_at_each_step_leaves_the_kernel_running(
    step: str, start_kernel: Any, api: Any, jp_serverapp: Any, monkeypatch: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = [1, 2, 3]")
    target, name, replacement = FAULTS[step]
    monkeypatch.setattr(target, name, replacement or fail_after_first_hash())

    error = await api("POST", "kernels", kernel_id, "hibernate", body=CRIU, expect=500)

    assert "hibernation failed, the kernel runs on" in error["message"]
    assert "injected" in error["message"]
    model = await api("GET", "kernels", kernel_id)
    assert model["execution_state"] != "hibernated"
    assert model["hibernation"]["state"] == "running"
    assert (await channel.execute("value.append(4); value"))["result"] == "[1, 2, 3, 4]"
    assert image_root_is_clean(jp_serverapp)

    monkeypatch.undo()
    await wait_for_state(api, kernel_id, "idle")
    await api("POST", "kernels", kernel_id, "hibernate")
    assert (await channel.execute("value"))["result"] == "[1, 2, 3, 4]"


async def test_a_kernel_that_ended_despite_an_error_is_hibernated_not_lost(
    start_kernel: Any, api: Any, monkeypatch: Any
) -> None:
    """Ending the kernel reports an error after the kernel ended: its image is kept."""
    kernel_id, channel = await start_kernel()
    await channel.execute("value = [1, 2, 3]")
    end = KernelHibernator._end_process

    async def end_then_fail(self: Any, km: Any, graceful: bool = False) -> None:
        await end(self, km, graceful)
        raise OSError("injected: error once the kernel ended")

    monkeypatch.setattr(KernelHibernator, "_end_process", end_then_fail)

    model = await api("POST", "kernels", kernel_id, "hibernate", body=CRIU)

    assert model["execution_state"] == "hibernated"
    assert (await channel.execute("value"))["result"] == "[1, 2, 3]"


async def test_kernel_criu_cannot_dump_runs_on_with_criu_reason(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    """A real CRIU refusal: the kernel is debugging (ptrace-attached to) its child."""
    kernel_id, channel = await start_kernel()
    assert (await channel.execute(TRACE_A_CHILD + "value = 'alive'"))["status"] == "ok"
    await wait_for_state(api, kernel_id, "idle")

    error = await api("POST", "kernels", kernel_id, "hibernate", body=CRIU, expect=500)

    assert "criu dump failed" in error["message"]
    assert (await channel.execute("value"))["result"] == "'alive'"
    assert image_root_is_clean(jp_serverapp)


async def test_failed_wake_keeps_the_image_and_a_later_wake_succeeds(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    """A real restore failure: a file the kernel holds open changed size while it slept."""
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 'kept'")
    await api("POST", "kernels", kernel_id, "hibernate")
    provisioner = jp_serverapp.kernel_manager.get_kernel(kernel_id).provisioner
    history = provisioner.files_dir / "history.sqlite"
    original = history.read_bytes()
    history.write_bytes(original + bytes(4096))

    error = await api("POST", "kernels", kernel_id, "wake", expect=500)

    assert "wake failed, the image is kept" in error["message"]
    assert "criu restore failed" in error["message"]
    model = await api("GET", "kernels", kernel_id)
    assert model["execution_state"] == "hibernated"
    assert "criu restore failed" in model["hibernation"]["error"]
    assert image_path(jp_serverapp, kernel_id).is_dir()

    history.write_bytes(original)
    await api("POST", "kernels", kernel_id, "wake")
    assert (await channel.execute("value"))["result"] == "'kept'"


async def test_unknown_kernel_is_404(start_kernel: Any, api: Any) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    assert (
        "no kernel" in (await api("POST", "kernels", missing, "hibernate", expect=404))["message"]
    )
    await api("POST", "kernels", missing, "wake", expect=404)


async def test_hibernating_twice_is_409(start_kernel: Any, api: Any) -> None:
    kernel_id, _ = await start_kernel()
    await api("POST", "kernels", kernel_id, "hibernate")
    error = await api("POST", "kernels", kernel_id, "hibernate", expect=409)
    assert "hibernated" in error["message"]


@pytest.mark.parametrize(
    ("body", "expect", "text"),
    [
        ({"engine": "zfs"}, 400, "'engine' must be one of auto, criu, dill"),
        ({"engine": 5}, 400, "'engine' must be one of auto, criu, dill"),
        ({"engine": "x" * (64 << 20)}, 400, "the request body is larger than 1024 bytes"),
        ({"forse": True}, 400, "unknown field 'forse' (this request takes engine, force)"),
        ({"force": "yes"}, 400, "'force' must be true or false"),
        ([1, 2], 400, "must be a JSON object"),
    ],
    ids=["unknown engine", "engine not a string", "64 MiB body", "unknown field", "force", "list"],
)
async def test_bad_requests_get_clear_errors(
    body: Any, expect: int, text: str, start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    error = await api("POST", "kernels", kernel_id, "hibernate", body=body, expect=expect)
    assert text in error["message"]
    assert error["reason"] == "bad-request"
    assert len(error["message"]) < 200, "an error never echoes its input"
    assert (await channel.execute("1 + 1"))["result"] == "2"


@pytest.mark.parametrize("hibernator_config", [{"criu_path": "/nonexistent/criu"}])
async def test_no_working_criu_is_503_when_criu_is_asked_for(start_kernel: Any, api: Any) -> None:
    kernel_id, channel = await start_kernel()
    error = await api("POST", "kernels", kernel_id, "hibernate", body=CRIU, expect=503)
    assert "criu cannot run here" in error["message"]
    assert "/nonexistent/criu" in error["message"]
    assert (await channel.execute("1 + 1"))["result"] == "2"
