"""The dill engine through the server: any kernel hibernates, and the user learns what was lost."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kernelhib import provisioner
from kernelhib.hibernator import EVENT_SCHEMA_ID
from kernelhib.recovery import kernel_processes

from .conftest import TRACE_A_CHILD, image_path, summarize, wait_for_state

DILL = {"engine": "dill"}

STATE = """
import os, socket, sqlite3, threading
import numpy as np, pandas as pd
os.environ['KERNELHIB_TEST'] = 'kept'
os.chdir(os.path.expanduser('~'))
shared = [1, 2]
alias = shared
def make_adder(n):
    def add(x):
        return x + n
    return add
add3 = make_adder(3)
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
point = Point(3, 4)
array = np.arange(10) ** 2
frame = pd.DataFrame({'a': [1, 2, 3]})
gen = (i for i in range(3))
sock = socket.socket()
lock = threading.Lock()
db = sqlite3.connect(':memory:')
"""

CHECK = (
    "(add3(4), point.x + point.y, alias is shared, int(array.sum()), int(frame.a.sum()), "
    "os.environ['KERNELHIB_TEST'], os.getcwd() == os.path.expanduser('~'), _, In[3])"
)


def lost_names(hibernation: dict[str, Any]) -> list[str]:
    return sorted(entry["name"] for entry in hibernation["lost"])


async def test_dill_hibernation_keeps_the_namespace_and_reports_what_it_lost(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    assert (await channel.execute(STATE))["status"] == "ok"
    assert (await channel.execute("'second cell'"))["result"] == "'second cell'"
    pid = jp_serverapp.kernel_manager.get_kernel(kernel_id).provisioner.kernel.pid

    model = await api("POST", "kernels", kernel_id, "hibernate", body=DILL)

    hibernation = model["hibernation"]
    assert hibernation["engine"] == "dill"
    assert lost_names(hibernation) == ["db", "gen", "lock", "sock"]
    assert all(entry["type"] and entry["reason"] for entry in hibernation["lost"])
    assert hibernation["freed_bytes"] > 0
    assert not Path(f"/proc/{pid}").exists()

    msg_id = channel.send("execute_request", {"code": CHECK})
    reply, output = await channel.reply_and_output(msg_id)
    first = summarize(reply, output)
    assert first["status"] == "ok", first
    assert first["result"] == "(7, 7, True, 285, 6, 'kept', True, 'second cell', \"'second cell'\")"
    notice = "".join(m["content"]["text"] for m in output if m["msg_type"] == "stream")
    assert "restored from a dill snapshot" in notice
    for name in ("db", "gen", "lock", "sock"):
        assert name in notice
    statuses = [
        m["content"]["execution_state"] for m in channel.received if m["msg_type"] == "status"
    ]
    assert "restarting" in statuses, "connected front ends must learn the process is new"

    second = await channel.execute("1 + 1")
    assert second["result"] == "2" and "dill snapshot" not in second["stdout"]
    assert second["execution_count"] == first["execution_count"] + 1


# Loading `big` raises MemoryError while the flag file exists, as torch raises its
# OutOfMemoryError for a tensor when the GPU is full (seen on an H200).
NEEDS_MEMORY = """
import os
def _rebuild(flag):
    if os.path.exists(flag):
        raise MemoryError("injected: no memory for it now")
    return 'big value'
class Big:
    def __init__(self, flag):
        self.flag = flag
    def __reduce__(self):
        return _rebuild, (self.flag,)
"""


async def test_a_wake_without_memory_for_a_value_fails_and_loses_nothing(
    start_kernel: Any, api: Any, jp_serverapp: Any, tmp_path: Path
) -> None:
    kernel_id, channel = await start_kernel()
    flag = tmp_path / "memory-is-short"
    await channel.execute(NEEDS_MEMORY + f"big = Big({str(flag)!r}); small = 42")
    await api("POST", "kernels", kernel_id, "hibernate", body=DILL)
    flag.touch()

    error = await api("POST", "kernels", kernel_id, "wake", expect=500)

    assert "big did not fit in the memory free now" in error["message"]
    assert "the image is kept" in error["message"]
    model = await api("GET", "kernels", kernel_id)
    assert model["execution_state"] == "hibernated"
    assert image_path(jp_serverapp, kernel_id).is_dir()
    flag.unlink()
    await api("POST", "kernels", kernel_id, "wake")
    assert (await channel.execute("big, small"))["result"] == "('big value', 42)"


async def test_an_altered_snapshot_is_never_loaded(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 42")
    await api("POST", "kernels", kernel_id, "hibernate", body=DILL)
    image = image_path(jp_serverapp, kernel_id)
    pickle_file = image / "namespace.pkl"
    original = pickle_file.read_bytes()
    pickle_file.write_bytes(original + b".")

    error = await api("POST", "kernels", kernel_id, "wake", expect=500)

    assert "does not match its signed hash" in error["message"]
    assert (await api("GET", "kernels", kernel_id))["execution_state"] == "hibernated"
    pickle_file.write_bytes(original)
    await api("POST", "kernels", kernel_id, "wake")
    assert (await channel.execute("value"))["result"] == "42"


@pytest.mark.parametrize("hibernator_config", [{"criu_path": "/nonexistent/criu"}])
async def test_auto_uses_dill_where_criu_cannot_run_and_says_why(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 'kept'")

    model = await api("POST", "kernels", kernel_id, "hibernate")

    assert model["hibernation"]["engine"] == "dill"
    assert "/nonexistent/criu" in model["hibernation"]["fallback_reason"]
    assert (await channel.execute("value"))["result"] == "'kept'"


async def check_no_pid_namespace_means_dill(start_kernel: Any, api: Any, reason: str) -> None:
    """The kernel shares the server's pid namespace; CRIU is refused, 'auto' uses dill."""
    kernel_id, channel = await start_kernel()
    [pid] = kernel_processes(kernel_id)
    assert Path(f"/proc/{pid}/ns/pid").readlink() == Path("/proc/self/ns/pid").readlink()
    await channel.execute("value = 'kept'")

    error = await api(
        "POST", "kernels", kernel_id, "hibernate", body={"engine": "criu"}, expect=503
    )
    model = await api("POST", "kernels", kernel_id, "hibernate")

    assert reason in error["message"]
    assert model["hibernation"]["engine"] == "dill"
    assert reason in model["hibernation"]["fallback_reason"]
    assert (await channel.execute("value"))["result"] == "'kept'"


@pytest.mark.parametrize("server_config", [{"HibernatingProvisioner": {"pid_namespace": "never"}}])
async def test_a_kernel_configured_without_pid_namespace_hibernates_with_dill(
    start_kernel: Any, api: Any
) -> None:
    await check_no_pid_namespace_means_dill(start_kernel, api, "pid_namespace is 'never'")


async def test_on_a_host_with_nvidia_gpus_kernels_get_no_pid_namespace(
    start_kernel: Any, api: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # CUDA cannot start in a pid namespace (checked on an H200); the driver's
    # control device is what tells a GPU host, here stood in for by a file.
    (device := tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(provisioner, "NVIDIA_CONTROL_DEVICE", device)
    await check_no_pid_namespace_means_dill(start_kernel, api, "this host has NVIDIA GPUs")


async def test_a_dill_hibernation_reports_the_gpu_memory_its_kernel_held(
    start_kernel: Any, api: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # nvidia-smi, stood in for by a script (CI has no GPU), lists 1234 MiB for each of
    # the kernel's processes and 999 MiB for another; only the kernel's tree counts.
    kernel_id, _ = await start_kernel()
    lines = "".join(f"echo '{pid}, 1234'\n" for pid in kernel_processes(kernel_id))
    (smi := tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\n{lines}echo '1, 999'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")

    model = await api("POST", "kernels", kernel_id, "hibernate", body=DILL)

    assert model["hibernation"]["gpu_freed_bytes"] == 1234 << 20


@pytest.mark.criu
async def test_auto_falls_back_to_dill_in_the_same_request_when_criu_refuses(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    assert (await channel.execute(TRACE_A_CHILD + "value = 'kept'"))["status"] == "ok"

    model = await api("POST", "kernels", kernel_id, "hibernate")

    hibernation = model["hibernation"]
    assert hibernation["engine"] == "dill"
    assert "CRIU could not checkpoint this kernel" in hibernation["fallback_reason"]
    assert "traced" in lost_names(hibernation)
    assert (await channel.execute("value"))["result"] == "'kept'"


@pytest.mark.criu
@pytest.mark.parametrize("hibernator_config", [{"keep_dill_snapshot": True}])
async def test_a_failed_criu_restore_wakes_from_the_kept_dill_snapshot(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 'kept'; gen = (i for i in range(3))")
    model = await api("POST", "kernels", kernel_id, "hibernate")
    assert model["hibernation"]["engine"] == "criu"
    assert "lost" not in model["hibernation"], "CRIU keeps the generator"
    # A file the kernel holds open changed size: CRIU refuses to restore.
    provisioner = jp_serverapp.kernel_manager.get_kernel(kernel_id).provisioner
    history = provisioner.files_dir / "history.sqlite"
    history.write_bytes(history.read_bytes() + bytes(4096))

    events: list[dict[str, Any]] = []
    jp_serverapp.event_logger.add_listener(
        schema_id=EVENT_SCHEMA_ID,
        listener=lambda logger, schema_id, data: _append(events, data),
    )
    await api("POST", "kernels", kernel_id, "wake")

    assert (await channel.execute("value"))["result"] == "'kept'"
    wake = [e for e in events if e["action"] == "wake"]
    assert wake and "CRIU could not restore" in wake[0]["fallback_reason"]
    assert [entry["name"] for entry in wake[0]["lost"]] == ["gen"]


async def _append(events: list[dict[str, Any]], data: Any) -> None:
    events.append(dict(data))


async def test_a_busy_kernel_is_refused_by_dill_even_with_force(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    msg_id = channel.send("execute_request", {"code": "import time; time.sleep(3)"})
    await wait_for_state(api, kernel_id, "busy")
    error = await api(
        "POST", "kernels", kernel_id, "hibernate", body={**DILL, "force": True}, expect=409
    )
    assert "between cells" in error["message"]
    await channel.next_reply(msg_id)
