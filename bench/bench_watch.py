"""What ``bnlab.doctor.watch`` costs per training step, measured side by side in one run.

The question's MLP (784-100-100-10, one BatchNorm1d shared by both hidden layers, as in
examples/question_torch.py) trains on real MNIST with the question's settings:
batch 1000, Adam lr 0.01, cross-entropy; the loop a user writes (forward, loss,
zero_grad, backward, step; no ``.item()``). Two copies of the model from the same
weights run the same batches: one plain, one inside ``with watch(model, optimizer=opt)``.
Rounds are interleaved in ABBA order (plain, watched | watched, plain | ...) so drift
on a shared machine hits both alike; the first round of each is left out as warm-up.

The per-step ratio excludes building the report at the end of the block (one probe on a
copy: a fixed cost per ``with`` block, printed on its own).

    PYTHONPATH=src python bench/bench_watch.py [--rounds 7] [--threads 1] [--json out.json]

Target (issue 11): watched / plain <= 1.10 per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def _batches(batch_size: int):
    import numpy as np
    import torch

    from bnlab.data import load_mnist, to_float

    data = load_mnist()
    x = torch.from_numpy(np.ascontiguousarray(to_float(data.train_images).reshape(-1, 784)))
    y = torch.from_numpy(np.asarray(data.train_labels).astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return [(x[idx], y[idx]) for idx in order.split(batch_size) if len(idx) == batch_size]


def _epoch(model, opt, batches) -> float:
    import torch.nn.functional as F

    model.train()
    start = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import torch
    from question_torch import MyModel

    from bnlab import doctor

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = _batches(args.batch_size)
    plain_model = MyModel()
    watched_model = copy.deepcopy(plain_model)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=0.01)
    watched_opt = torch.optim.Adam(watched_model.parameters(), lr=0.01)

    def run_watched() -> float:
        with doctor.watch(watched_model, optimizer=watched_opt) as w:
            seconds = _epoch(watched_model, watched_opt, batches)
            leave = time.perf_counter()
        reports.append(time.perf_counter() - leave)  # the report is built in __exit__
        assert w.steps == len(batches), (w.steps, len(batches))
        runs.append(w)
        return seconds

    plain, watched, reports, runs = [], [], [], []
    for round_ in range(args.rounds):
        # ABBA order: whichever runs second in a round is not always the same one
        if round_ % 2 == 0:
            plain.append(_epoch(plain_model, plain_opt, batches))
            watched.append(run_watched())
        else:
            watched.append(run_watched())
            plain.append(_epoch(plain_model, plain_opt, batches))
    w = runs[-1]
    plain_s, watched_s = statistics.median(plain[1:]), statistics.median(watched[1:])
    paired = statistics.median(b / a for a, b in zip(plain[1:], watched[1:]))
    steps = len(batches)
    figures = {
        "steps_per_epoch": steps,
        "rounds": args.rounds,
        "plain_ms_per_step": 1000 * plain_s / steps,
        "watched_ms_per_step": 1000 * watched_s / steps,
        "ratio_watched_over_plain": watched_s / plain_s,
        "ratio_paired_median": paired,
        "report_s": statistics.median(reports[1:]),
        "same_weights": all(
            torch.equal(a, b) for a, b in zip(plain_model.state_dict().values(), watched_model.state_dict().values())
        ),
        "findings": sorted({f.check for f in w.report().findings}),
    }
    print(
        f"question MLP, batch {args.batch_size}, {steps} steps per epoch, "
        f"{args.rounds} interleaved rounds (first left out), {args.threads} thread(s)"
    )
    print(
        f"plain loop:   {figures['plain_ms_per_step']:.2f} ms/step (epochs: {', '.join(f'{t:.3f}' for t in plain)} s)"
    )
    print(
        f"watched loop: {figures['watched_ms_per_step']:.2f} ms/step "
        f"(epochs: {', '.join(f'{t:.3f}' for t in watched)} s)"
    )
    print(
        f"watched / plain per step: {figures['ratio_watched_over_plain']:.3f} (medians), "
        f"{paired:.3f} (median of the rounds' ratios); target <= 1.10"
    )
    print(f"report at the end of the block: {figures['report_s']:.3f} s (once per `with`)")
    print(f"same weights after training: {figures['same_weights']}; watch found: {', '.join(figures['findings'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
