"""``watch`` across the ranks of a real DistributedDataParallel job: 2 processes, gloo,
127.0.0.1, real MNIST (tests/doctor/ddp_worker.py is one rank; examples/ddp_watch.py the
user's script). Every subprocess runs under a timeout: a hang fails the test, never blocks it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ddp_jobs import assert_rank_divergent_stats, job_env, run_job

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LIMIT_S = 240  # per job, start-up of two torch processes on a busy machine included


def job(scenario: str, tmp_path: Path) -> dict[int, dict]:
    return run_job(HERE / "ddp_worker.py", scenario, tmp_path, LIMIT_S)


def checks(result: dict) -> set[str]:
    return {finding["check"] for finding in result["report"]["findings"]}


def test_healthy_job_compares_the_ranks_and_finds_nothing(tmp_path: Path) -> None:
    results = job("healthy", tmp_path)
    for rank in (0, 1):
        report = results[rank]["report"]
        assert any("compared the 2 ranks" in note for note in report["notes"]), report["notes"]
        assert not [f for f in report["findings"] if f["severity"] != "info"], report
        assert report["exit_code"] == 0
        assert results[rank]["groups_after"] == results[rank]["groups_before"]  # the doctor's group is gone
    assert "bnlab doctor: MyModel" in results[0]["output"]  # rank 0 prints the report ...
    assert "bnlab doctor:" not in results[1]["output"]  # ... rank 1 only returns it


def test_no_broadcast_buffers_is_rank_divergent_stats(tmp_path: Path) -> None:
    results = job("no-broadcast", tmp_path)
    for rank in (0, 1):
        assert_rank_divergent_stats(results[rank]["report"])
    assert "[rank-divergent-stats]" in results[0]["output"]


def test_small_batch_per_rank_without_syncbn(tmp_path: Path) -> None:
    # (SyncBatchNorm itself runs on GPUs only: its absence of a finding is tested in-process below)
    results = job("small-batch", tmp_path)
    found = [f for f in results[0]["report"]["findings"] if f["check"] == "small-batch-per-rank"]
    assert {f["where"] for f in found} == {"bn1", "bn2"}
    for finding in found:
        assert finding["data"]["global_batch"] == 8 and finding["data"]["world_size"] == 2
        assert finding["data"]["per_rank"]["0"]["values_per_channel"] == 4
        assert "convert_sync_batchnorm" in finding["fix_code"]
    assert "small-batch" not in checks(results[0])  # reported once, as the rank problem it is


def test_a_killed_rank_ends_the_other_in_bounded_time_with_a_message(tmp_path: Path) -> None:
    results = job("killed", tmp_path)
    assert 1 not in results  # rank 1 died inside its with block (os._exit)
    survivor = results[0]
    assert survivor["rc"] == 0
    assert survivor["exit_s"] < 5.0 + 20.0  # the exchange's timeout (5 s here) plus the probe
    (problem,) = [note for note in survivor["report"]["notes"] if "could not compare" in note]
    assert "rank died, hung, or did not reach the end" in problem and "covers rank 0 alone" in problem


def test_a_late_rank_does_not_hold_the_others_past_the_timeout(tmp_path: Path) -> None:
    results = job("late", tmp_path)
    assert results[0]["exit_s"] < 5.0 + 20.0  # rank 1 arrives 15 s late: rank 0 is gone by then
    for rank in (0, 1):  # and rank 1, arriving alone, fails as fast
        assert results[rank]["rc"] == 0
        assert any("could not compare" in note for note in results[rank]["report"]["notes"])


def test_a_rank_that_raised_is_named_and_its_exception_kept(tmp_path: Path) -> None:
    results = job("raised", tmp_path)
    assert results[1]["raised"] == "planted failure on rank 1"  # the user's exception propagates
    notes = results[0]["report"]["notes"]
    assert any("rank 1 left its `with watch` block with an exception (ValueError" in n for n in notes), notes


def test_uneven_step_counts_are_a_note(tmp_path: Path) -> None:
    results = job("uneven", tmp_path)
    notes = results[0]["report"]["notes"]
    assert any("different numbers of training steps (rank 0: 20, rank 1: 18)" in n for n in notes), notes
    assert results[1]["report"]["probe"]["watched_steps"] == 18


def test_example_script_runs_two_processes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ddp_watch.py"), "--steps", "10", "--batch", "4"],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("bnlab doctor: MyModel") == 1  # printed by rank 0 only
    assert "WARNING [small-batch-per-rank]" in done.stdout


# -- the checks on what ranks report, in-process (no job needed) ------------------------


def _info(stats: list[tuple[list[float], list[float]]], plain: list[str], batch: int = 64, small=None):
    import numpy as np

    from bnlab.doctor.records import RanksInfo, RankView, SmallCall

    views = [
        RankView(
            rank=rank,
            steps=5,
            passes=5,
            batch=batch,
            synced_stats={"bn": (np.array(mean), np.array(var))},
            final_stats={"bn": (float(np.mean(mean)), float(np.mean(var)))},
            smallest={"bn": SmallCall(*small, site="after l1")} if small else {},
        )
        for rank, (mean, var) in enumerate(stats)
    ]
    return RanksInfo(rank=0, world_size=len(stats), views=views, plain_bn=plain)


def _findings(info, check: str):
    from bnlab.doctor.backends import load
    from bnlab.doctor.records import ProbeResult
    from bnlab.doctor.registry import Context, get

    probe = ProbeResult("torch", "M", (4, 3), {}, [], {}, ranks=info)
    return get(check).run(Context(probe, load("torch").fixes))


def test_equal_statistics_are_no_finding_and_a_difference_is_one() -> None:
    same = _info([([0.5, 1.0], [2.0, 3.0])] * 2, plain=["bn"])
    assert _findings(same, "rank-divergent-stats") == []
    apart = _info([([0.5, 1.0], [2.0, 3.0]), ([0.5, 1.25], [2.0, 3.0])], plain=["bn"])
    (finding,) = _findings(apart, "rank-divergent-stats")
    assert finding.data["running_mean_max_abs_diff"] == 0.25 and "channel 1" in finding.evidence[0]


def test_syncbn_layers_and_big_batches_are_no_small_batch_per_rank() -> None:
    stats = [([0.0], [1.0])] * 2
    assert _findings(_info(stats, plain=[], batch=4, small=(4, 4)), "small-batch-per-rank") == []  # SyncBatchNorm
    assert _findings(_info(stats, plain=["bn"], batch=64), "small-batch-per-rank") == []
    (finding,) = _findings(_info(stats, plain=["bn"], batch=4, small=(4, 4)), "small-batch-per-rank")
    assert finding.severity == "warning" and finding.data["global_batch"] == 8
    (single,) = _findings(_info(stats, plain=["bn"], batch=1, small=(1, 1)), "small-batch-per-rank")
    assert single.severity == "error"


def test_a_rank_view_travels_as_json_and_back() -> None:
    from bnlab.doctor import ranks

    view = _info([([0.5, float("nan")], [2.0, 3.0])], plain=["bn"], small=(4, 4)).views[0]
    back = ranks.decode(ranks.encode(view))
    assert back.smallest == view.smallest and repr(back.final_stats) == repr(view.final_stats)
    assert str(back.synced_stats["bn"][0].tolist()) == "[0.5, nan]"
