"""`--ray-address`: joining a Ray cluster started apart from bnlab (`ray start --head` on
127.0.0.1, a real one, no mock), as a user with a cluster would. The sweep trains on it,
gives the local executor's histories, resumes, and leaves the cluster running; an address
where nothing listens is a usage error at once (Ray itself waits for minutes).

Its own module, after tests/test_ray.py's: one Ray runtime per process at a time, and this
cluster's processes are found and stopped by a marker in their environment, never by
`ray stop` (which would stop every Ray cluster of the machine)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray")

from bnlab.errors import UsageError  # noqa: E402
from bnlab.ray_executor import check_reachable  # noqa: E402
from bnlab.rundir import read_run  # noqa: E402
from bnlab.sweep import InlineExecutor, plan_sweep, run_sweep  # noqa: E402

BIN = Path(sys.executable).parent
TINY = ["--set", "widths=784,16,16,10", "--epochs", "2"]
MARKER = "BNLAB_RAY_ADDRESS_TEST_MARKER"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def marked_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"{MARKER}={marker}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def stop(marker: str) -> list[int]:
    """SIGTERM the cluster's processes, SIGKILL what is left after 20 s; returns the pids
    that needed SIGKILL."""
    for pid in marked_processes(marker):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + 20
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = marked_processes(marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


@pytest.fixture(scope="module")
def head_node():
    """`ray start --head` on 127.0.0.1 with a free port and its own temp dir (short: Ray's
    socket paths must fit 107 bytes); yields "127.0.0.1:PORT"."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc to find the cluster's processes")
    marker = uuid.uuid4().hex
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="bnray-")
    env = {**os.environ, MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2"]
        + ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"127.0.0.1:{port}"
    finally:
        stop(marker)  # SIGTERM first, as `ray stop` does; none may outlive the module
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not marked_processes(marker)


def bnlab(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "bnlab"), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ}
    )


def histories(out: Path) -> dict[str, list]:
    """Each run's epochs without their seconds (the one field that differs run to run)."""
    found = {}
    for path in sorted(out.glob("runs/*/seed*/history.json")):
        run = read_run(path.parent)
        assert run is not None and run.status == "complete"
        found[str(path.parent.relative_to(out))] = [
            (r.epoch, r.train_loss, r.val_loss, r.train_acc, r.val_acc) for r in run.history
        ]
    return found


def test_compare_joins_a_cluster_started_apart_and_leaves_it_running(head_node, tmp_path):
    out = tmp_path / "sweep"
    args = ["compare", "--presets", "question,answer", "--seeds", "0,1", *TINY, "--out", str(out)]
    first = bnlab(*args, "--executor", "ray", "--ray-address", head_node, "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)
    assert sorted(run["status"] for run in result["runs"]) == ["complete"] * 4

    overrides = {"widths": "784,16,16,10", "epochs": "2", "threads": "1"}
    run_sweep(plan_sweep(["question", "answer"], [0, 1], tmp_path / "inline", overrides), InlineExecutor())
    on_ray, inline = histories(out), histories(tmp_path / "inline")
    assert len(on_ray) == 4 and on_ray == inline

    check_reachable(head_node)  # the cluster bnlab joined is still up
    again = bnlab(*args, "--executor", "ray", "--ray-address", head_node, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(run["cached"] for run in json.loads(again.stdout)["runs"])


def test_an_address_where_nothing_listens_is_a_usage_error_at_once(tmp_path):
    port = free_port()  # bound and released: nothing listens there
    started = time.monotonic()
    result = bnlab(
        "compare", "--presets", "answer", "--seeds", "0", *TINY, "--out", str(tmp_path / "o"),
        "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"127.0.0.1:{port}" in result.stderr and "ray start --head" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60  # Ray alone still waited after 200 s
    assert not (tmp_path / "o" / "runs" / "answer" / "seed0" / "history.json").exists()


@pytest.mark.parametrize("address", ["6379", "127.0.0.1", "127.0.0.1:port", ":6379"])
def test_an_address_without_host_and_port_is_refused(address):
    with pytest.raises(UsageError, match="not an address"):
        check_reachable(address)
