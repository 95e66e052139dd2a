"""Run both ranks of a real 2-process job (gloo, 127.0.0.1) for the doctor's DDP tests.

Each rank is ``python WORKER SCENARIO RANK PORT OUT_DIR`` and writes ``OUT_DIR/rank<RANK>.json``;
every job runs under a deadline, so a hang fails the test instead of blocking it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def job_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore::FutureWarning"}


def run_job(worker: Path, scenario: str, tmp_path: Path, limit_s: float) -> dict[int, dict]:
    """Both ranks of one scenario; each rank's JSON (a killed rank writes none), with its
    output and exit status."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), scenario, str(rank), str(port), str(tmp_path)],
            env=job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    deadline = time.monotonic() + limit_s
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"{scenario}: the 2-process job hung past {limit_s} s")
    results = {}
    for rank in range(2):
        path = tmp_path / f"rank{rank}.json"
        if path.exists():
            results[rank] = json.loads(path.read_text()) | {"output": outputs[rank], "rc": procs[rank].returncode}
    return results


def assert_rank_divergent_stats(report: dict) -> None:
    """A 2-rank job whose ranks kept their own statistics (broadcast_buffers=False): the
    finding on both BN layers of the question's MLP, with each rank's values."""
    found = [f for f in report["findings"] if f["check"] == "rank-divergent-stats"]
    assert {f["where"] for f in found} == {"bn1", "bn2"}, report
    for finding in found:
        assert finding["data"]["ranks"] == [0, 1]
        assert finding["data"]["running_mean_max_abs_diff"] > 1e-3
        assert [r["rank"] for r in finding["data"]["per_rank"]] == [0, 1]
        assert "rank 0's statistics only" in finding["consequence"]
