"""What ``bnlab.doctor.watch`` costs per step inside a 2-process DistributedDataParallel job.

bench/bench_watch.py's measurement, across ranks: the question's MLP (one BatchNorm1d
shared by both hidden layers, examples/question_torch.py) on real MNIST, batch 1000 split
over 2 ranks (every other batch per rank), Adam lr 0.01, gloo on 127.0.0.1. In each rank
two DDP copies of the model from the same weights run the same batches, one plain, one
inside ``with watch(model, optimizer=opt)``, in interleaved ABBA rounds (the first round
of each left out as warm-up). The per-step ratio excludes the end of the block (the
ranks' exchange and the probe: a fixed cost per ``with``, printed on its own).

    PYTHONPATH=src python bench/bench_watch_ddp.py [--rounds 7] [--threads 1] [--json out.json]

Target (issue 19): watched / plain <= 1.10 per step, as for one process.
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import statistics
import sys
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))

WORLD = 2


def rank_main(rank: int, port: int, args: argparse.Namespace, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from bench_watch import _batches, _epoch
    from question_torch import MyModel
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bnlab import doctor
    from bnlab.doctor.backends.torch import distributed as torch_distributed

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    batches = _batches(args.batch_size)[rank::WORLD]
    base = MyModel()
    plain_model, watched_model = DDP(copy.deepcopy(base)), DDP(copy.deepcopy(base))
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=0.01)
    watched_opt = torch.optim.Adam(watched_model.parameters(), lr=0.01)
    plain, watched, reports = [], [], []
    report = None

    def run_watched() -> float:
        nonlocal report
        with doctor.watch(watched_model, optimizer=watched_opt) as w:
            seconds = _epoch(watched_model, watched_opt, batches)
            leave = time.perf_counter()
        reports.append(time.perf_counter() - leave)  # exchange + probe, in __exit__
        report = w.report()
        return seconds

    for round_ in range(args.rounds):  # the same order on every rank: DDP steps pair up
        if round_ % 2 == 0:
            plain.append(_epoch(plain_model, plain_opt, batches))
            watched.append(run_watched())
        else:
            watched.append(run_watched())
            plain.append(_epoch(plain_model, plain_opt, batches))
    assert report is not None
    steps = len(batches)
    # The one per-step cost DDP adds to watch, timed alone (less exposed to a noisy machine):
    # copying the BN statistics as a synchronising training pass begins.
    exchange = torch_distributed.exchange_for(watched_model)
    assert exchange is not None
    watched_model.train()
    copy_us = (
        1e6 * min(timeit.repeat(lambda: exchange._pass_start(watched_model.module, ()), number=1000, repeat=5)) / 1000
    )
    figures = {
        "rank": rank,
        "steps_per_epoch": steps,
        "plain_ms_per_step": 1000 * statistics.median(plain[1:]) / steps,
        "watched_ms_per_step": 1000 * statistics.median(watched[1:]) / steps,
        "ratio_watched_over_plain": statistics.median(watched[1:]) / statistics.median(plain[1:]),
        "ratio_paired_median": statistics.median(b / a for a, b in zip(plain[1:], watched[1:], strict=True)),
        "report_s": statistics.median(reports[1:]),
        "stats_copy_us_per_step": copy_us,
        "plain_epochs_s": plain,
        "watched_epochs_s": watched,
        "findings": sorted({f.check for f in report.findings}),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=500, help="per rank (default 500: 1000 over 2 ranks)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.get_context("spawn")
        procs = [context.Process(target=rank_main, args=(rank, port, args, Path(tmp))) for rank in range(WORLD)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode for proc in procs):
            print("a rank failed", file=sys.stderr)
            return 1
        ranks = [json.loads((Path(tmp) / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    print(
        f"question MLP under DDP, {WORLD} processes (gloo), batch {args.batch_size} per rank, "
        f"{ranks[0]['steps_per_epoch']} steps per epoch, {args.rounds} interleaved rounds (first left out), "
        f"{args.threads} thread(s) per rank"
    )
    for fig in ranks:
        print(
            f"rank {fig['rank']}: plain {fig['plain_ms_per_step']:.2f} ms/step, watched "
            f"{fig['watched_ms_per_step']:.2f} ms/step -> {fig['ratio_watched_over_plain']:.3f} (medians), "
            f"{fig['ratio_paired_median']:.3f} (median of the rounds' ratios); target <= 1.10; "
            f"end of block {fig['report_s']:.3f} s; statistics copy {fig['stats_copy_us_per_step']:.1f} us/step"
        )
    print(f"watch found: {', '.join(ranks[0]['findings'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(ranks, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
