"""Watch a 2-process DistributedDataParallel job with bnlab's doctor.

    PYTHONPATH=src python examples/ddp_watch.py [--no-broadcast-buffers] [--batch 4]
    PYTHONPATH=src torchrun --nproc-per-node 2 examples/ddp_watch.py [same options]

Each rank trains the question's MLP, fixed (784-100-100-10, one BatchNorm1d per hidden
layer, examples/answer_torch.py), wrapped in DDP (gloo backend, 127.0.0.1), on its own
shard of real MNIST, inside ``bnlab.doctor.watch``. At the end of the block the ranks
compare what they saw; rank 0 prints the report, every rank gets it from ``report()``.

- as it is: a healthy job, nothing to report;
- ``--no-broadcast-buffers``: each rank keeps its own running statistics (a warning:
  a checkpoint saved on rank 0 keeps rank 0's);
- ``--batch 4``: 4 samples per rank through plain BatchNorm (a warning: SyncBatchNorm,
  whose statistics cover the global batch; it runs on GPUs, with the nccl backend).

Without torchrun it starts its 2 processes itself (torch.multiprocessing, spawn) on a free
port. Exit status: the worst rank's (1 when a report holds an error).
"""

from __future__ import annotations

import argparse
import inspect
import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from answer_torch import MyModel
from torch.nn.parallel import DistributedDataParallel as DDP

from bnlab import doctor
from bnlab.data import load_mnist, to_float

WORLD = 2


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=200, help="samples per rank and step (default 200)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--no-broadcast-buffers", action="store_true", help="DDP(broadcast_buffers=False)")
    return parser.parse_args(argv)


def make_model(args: argparse.Namespace) -> DDP:
    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway; the same seed keeps runs alike
    model = MyModel()
    sync = not args.no_broadcast_buffers
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (the old name warns)
    name = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    )
    return DDP(model, **{name: sync})


def shard(rank: int, world: int, args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches: every world-th sample of a shuffled MNIST training set."""
    data = load_mnist()
    x = torch.as_tensor(to_float(data.train_images))
    y = torch.as_tensor(data.train_labels.astype("int64"))
    mine = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[rank::world]
    return [(x[idx], y[idx]) for idx in mine[: args.batch * args.steps].split(args.batch)]


def train(
    model: DDP, batches: list[tuple[torch.Tensor, torch.Tensor]], inside: Callable[[], None] | None = None
) -> doctor.Report:
    """The user's loop inside ``watch`` (``inside`` runs last in the block: the tests' faults)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with doctor.watch(model, optimizer=optimizer) as watched:  # on every rank
        model.train()
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if inside is not None:
            inside()
    return watched.report()  # rank 0 has printed it


def worker(rank: int, world: int, port: int | None, argv: list[str]) -> int:
    args = options(argv)
    torch.set_num_threads(1)
    if port is None:  # torchrun: rank, world and rendezvous come from the environment
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    else:
        address = f"tcp://127.0.0.1:{port}"
        dist.init_process_group(
            "gloo", init_method=address, rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
    try:
        report = train(make_model(args), shard(dist.get_rank(), dist.get_world_size(), args))
    finally:
        dist.destroy_process_group()
    return report.exit_code


def _spawned(rank: int, world: int, port: int, argv: list[str]) -> None:
    sys.exit(worker(rank, world, port, argv))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options(argv)  # --help and bad options before any process starts
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, argv)
    port, context = free_port(), mp.get_context("spawn")
    procs = [context.Process(target=_spawned, args=(rank, WORLD, port, argv)) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return max(proc.exitcode or 0 for proc in procs)


if __name__ == "__main__":
    sys.exit(main())
