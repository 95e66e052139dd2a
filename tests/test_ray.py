"""RayExecutor against a real local Ray cluster on 127.0.0.1 (no mock): the same histories
as the local executor, progress events as they happen, resume, a worker killed mid-run
whose run is redone, and no Ray process left behind. One cluster for the whole module
(Ray takes tens of seconds to start on the shared 2-core machine)."""

import io
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from bnlab.cli import main  # noqa: E402
from bnlab.errors import MissingExtra  # noqa: E402
from bnlab.ray_executor import RayExecutor, import_ray  # noqa: E402
from bnlab.sweep import InlineExecutor, LocalProcessExecutor, SweepEvent, SweepProgress, plan_sweep, run_sweep  # noqa: E402

TINY = {"widths": "784,16,16,10", "threads": 1}
MARKER = "BNLAB_RAY_TEST_MARKER"


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker``, except this one and its
    multiprocessing resource tracker (started by LocalProcessExecutor, it lives as long as
    this process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if (
                    marker.encode() in (entry / "environ").read_bytes()
                    and b"resource_tracker" not in (entry / "cmdline").read_bytes()
                ):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def task_processes(marker: str) -> list[int]:
    """Ray worker processes of this cluster busy in a bnlab training task (Ray titles a
    worker after the task it runs)."""
    pids = []
    for pid in processes_with(marker):
        try:
            if b"train_task" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def cluster():
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc to check that no Ray process outlives the tests")
    marker = uuid.uuid4().hex
    os.environ[MARKER] = marker  # inherited by every process of the cluster
    try:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
        )
        yield marker
    finally:
        ray.shutdown()
        del os.environ[MARKER]
        deadline = time.monotonic() + 30
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: command_line(pid) for pid in processes_with(marker)}
        for pid in left:  # never leave them running, even when the assertion fails
            os.kill(pid, signal.SIGKILL)
        assert not left, f"Ray processes outlived the cluster: {left}"


def history_rows(outcome):
    return [(r.epoch, r.train_loss, r.val_loss, r.train_acc, r.val_acc) for r in outcome.history]


def test_a_two_worker_ray_sweep_gives_the_local_executors_histories_and_resumes(cluster, tmp_path):
    overrides = {**TINY, "epochs": "2"}
    local = run_sweep(
        plan_sweep(["question", "answer"], [0, 1], tmp_path / "local", overrides), LocalProcessExecutor(2)
    )
    specs = plan_sweep(["question", "answer"], [0, 1], tmp_path / "ray", overrides)
    events = []
    on_ray = run_sweep(specs, RayExecutor(workers=2), events.append)
    assert [o.status for o in on_ray] == ["complete"] * 4
    assert [history_rows(o) for o in on_ray] == [history_rows(o) for o in local]
    for spec in specs:  # per run: start, its epochs in order, done; as with the local executor
        mine = [e for e in events if e.spec.run_dir == spec.run_dir]
        assert [e.kind for e in mine] == ["start", "epoch", "epoch", "done"]
        assert [e.record.epoch for e in mine if e.kind == "epoch"] == [0, 1]
        assert (spec.run_dir / "checkpoint.pt").exists()
    in_flight = [0]
    for e in events:  # never more runs at once than workers
        in_flight.append(in_flight[-1] + {"start": 1, "done": -1}.get(e.kind, 0))
    assert max(in_flight) == 2
    again = run_sweep(specs, RayExecutor(workers=2))
    assert all(o.cached for o in again) and [history_rows(o) for o in again] == [history_rows(o) for o in local]


def test_a_killed_worker_is_redone_and_finished_runs_are_kept(cluster, tmp_path):
    first = plan_sweep(["answer"], [0], tmp_path / "ray", {**TINY, "epochs": "1"})
    victim = plan_sweep(["question"], [1], tmp_path / "ray", {**TINY, "epochs": "5"})
    last = plan_sweep(["no-bn"], [0], tmp_path / "ray", {**TINY, "epochs": "1"})
    specs = first + victim + last
    events, killed, finished_at = [], [], {}

    def on_event(event: SweepEvent) -> None:
        events.append(event)
        if event.kind == "done":
            finished_at[event.spec.run_dir] = (event.spec.run_dir / "history.json").stat().st_mtime_ns
        if event.spec == victim[0] and event.kind == "epoch" and event.record.epoch == 1 and not killed:
            busy = task_processes(cluster)
            assert len(busy) == 1, busy  # one worker: it is the victim's
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])

    outcomes = RayExecutor(workers=1).map_runs(specs, on_event)
    assert killed and [o.status for o in outcomes] == ["complete"] * 3
    kinds = [e.kind for e in events if e.spec == victim[0]]
    assert kinds[0] == "start" and kinds.count("restart") == 1 and kinds[-1] == "done"
    assert kinds[kinds.index("restart") + 1 :].count("epoch") == 5
    assert [e.kind for e in events if e.spec == first[0]] == ["start", "epoch", "done"]
    # The run finished before the kill is untouched; the redone one matches a fresh run.
    assert (first[0].run_dir / "history.json").stat().st_mtime_ns == finished_at[first[0].run_dir]
    fresh = run_sweep(plan_sweep(["question"], [1], tmp_path / "inline", {**TINY, "epochs": "5"}), InlineExecutor())
    assert history_rows(outcomes[1]) == history_rows(fresh[0])
    assert len(outcomes[1].history) == 5


def test_compare_with_executor_ray_on_the_running_cluster(cluster, tmp_path, capsys):
    argv = [
        "compare",
        "--presets",
        "answer",
        "--grid",
        "bn_momentum=0.01,0.5",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--set",
        "widths=784,16,16,10",
        "--out",
        str(tmp_path),
        "--executor",
        "ray",
        "--workers",
        "2",
    ]
    assert main(argv) == 0
    assert "answer bn_momentum=0.5 seed 0: complete" in capsys.readouterr().out
    assert (tmp_path / "report" / "report.html").exists()
    assert ray.is_initialized()  # a cluster it did not start is left running


def test_ray_flags_and_the_missing_extra_are_usage_errors(tmp_path, capsys, monkeypatch):
    assert main(["compare", "--presets", "answer", "--ray-address", "auto", "--out", str(tmp_path)]) == 2
    assert "--ray-address needs --executor ray" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(MissingExtra, match="bnlab\\[ray\\]"):
        import_ray()


def test_progress_counts_a_restarted_run_again():
    specs = plan_sweep(["answer"], [0], "/nonexistent", {"epochs": "3"})
    progress = SweepProgress(1, 3, file=io.StringIO())
    progress(SweepEvent("start", specs[0]))
    progress(SweepEvent("epoch", specs[0]))
    progress(SweepEvent("restart", specs[0]))
    for _ in range(3):
        progress(SweepEvent("epoch", specs[0]))
    assert (progress.bar.n, progress.bar.total) == (4, 4)
    progress(SweepEvent("done", specs[0]))
    assert progress.bar.total == 4
    progress.close()
