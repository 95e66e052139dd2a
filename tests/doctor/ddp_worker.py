"""One rank of a real 2-process DDP job for tests/doctor/test_doctor_ddp.py.

    python ddp_worker.py SCENARIO RANK PORT OUT_DIR

Trains examples/ddp_watch.py's model on real MNIST (gloo, 127.0.0.1:PORT) inside
``doctor.watch``, then writes ``OUT_DIR/rank<RANK>.json``: the report, and how long the
end of the ``with`` block took. Scenarios: healthy, no-broadcast, small-batch,
killed (rank 1 dies inside the block), late (rank 1 reaches the end of its
block 15 s late), raised (rank 1 raises inside the block), uneven
(rank 1 trains 2 steps fewer, under DDP's join()).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import ddp_watch  # noqa: E402

from bnlab import doctor  # noqa: E402
from bnlab.doctor.backends.torch import distributed as torch_distributed  # noqa: E402

ARGS = {
    "healthy": [],
    "no-broadcast": ["--no-broadcast-buffers"],
    "small-batch": ["--batch", "4"],
    "killed": [],
    "raised": [],
    "late": [],
    "uneven": [],
}


def uneven(model, batches, rank: int) -> doctor.Report:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with doctor.watch(model, optimizer=optimizer) as watched, model.join():
        for x, y in batches[: len(batches) - 2 * rank]:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return watched.report()


def main() -> None:
    scenario, rank, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    torch_distributed.EXCHANGE_TIMEOUT_S = 5.0  # the killed rank: keep the test short
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    args = ddp_watch.options(["--steps", "20", "--batch", "100", *ARGS[scenario]])
    model, batches = ddp_watch.make_model(args), ddp_watch.shard(rank, 2, args)
    marks: dict[str, float] = {}

    def inside() -> None:
        marks["end_of_loop"] = time.monotonic()
        if rank == 1 and scenario == "killed":
            os._exit(3)
        if rank == 1 and scenario == "late":
            time.sleep(15)  # alive, but at the end of its block long after rank 0 gave up
        if rank == 1 and scenario == "raised":
            raise ValueError("planted failure on rank 1")

    groups = dist.distributed_c10d._world.pg_map  # the job's process groups
    result: dict = {"rank": rank, "groups_before": len(groups)}
    try:
        report = uneven(model, batches, rank) if scenario == "uneven" else ddp_watch.train(model, batches, inside)
        result["report"] = report.to_dict()
        result["exit_s"] = time.monotonic() - marks.get("end_of_loop", time.monotonic())
        result["groups_after"] = len(groups)
    except ValueError as err:
        result["raised"] = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if scenario != "killed":  # with a dead peer, tearing down the job's own group is the user's business
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
