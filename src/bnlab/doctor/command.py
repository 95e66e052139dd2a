"""``bnlab doctor FILE.py:NAME``: the command-line face of :func:`bnlab.doctor.check`.

Exit status: 0 when no finding is an error, 1 when one is, 2 for usage errors and for
models that cannot be loaded or run (the message says what to do).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from bnlab.doctor import inputs as probe_inputs
from bnlab.doctor.errors import ProbeError, UsageError
from bnlab.doctor.findings import Report
from bnlab.doctor.loader import LoadError, load_model

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2

DESCRIPTION = (
    "Find batch-normalization mistakes in your own model (a BN shared between layers, "
    "stale running statistics, train/eval divergence, momentum conventions...), each "
    "with the numbers that prove it. Exit 0: no error; 1: errors found; 2: usage error."
)

# One MNIST epoch at batch 1000. Measured on the seed's MLP (Adam lr 0.01): after 60
# steps the shared BN's call sites are ~0.8 SD apart and train/eval predictions differ
# for 6-12% of samples (1-3% with one BN per layer); eval accuracy falls below 0.80, as
# in the seed, only after ~200-300 steps. Sharing itself is found with 0 steps.
DEFAULT_DATA_STEPS = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bnlab doctor``."""
    parser.add_argument("target", metavar="FILE.py:NAME",
                        help="file defining the model, and NAME: a model class or a "
                             "zero-argument function returning a model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input-shape", metavar="N,D,...",
                        help="probe with standard-normal inputs of this shape, e.g. 1000,784")
    source.add_argument("--data", choices=["mnist"],
                        help="probe with real MNIST test images (shaped as the model needs), "
                             "train on MNIST training images")
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST files")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="probe (and training) batch size with --data (default 1000); "
                             "replaces the first dimension of --input-shape")
    parser.add_argument("--train-steps", type=int, default=None,
                        help=f"optimizer steps on a copy before probing (Adam, cross-entropy; "
                             f"default {DEFAULT_DATA_STEPS} with --data, 0 with --input-shape)")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="learning rate of the training steps (default 0.01)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for weights, data order and inputs (default 0)")
    parser.add_argument("--framework", choices=["auto", "torch", "chainer"], default="auto",
                        help="framework of the model (default: detected)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _fail(message: str) -> int:
    print(f"bnlab doctor: {message}", file=sys.stderr)
    return EXIT_USAGE


def _seed(seed: int) -> None:
    """The CLI owns its process: seed everything that initialises or feeds the model."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)  # Chainer's initializers draw from numpy's global RNG
    torch.manual_seed(seed)


def _framework(model: Any, wanted: str) -> str:
    from bnlab.doctor.backends import detect

    try:
        return detect(model, wanted).NAME
    except UsageError as err:
        raise LoadError(str(err).replace("framework '", "--framework '")) from err


def _probe_data(args: argparse.Namespace, model: Any, framework: str) -> dict[str, Any]:
    """Keyword arguments of ``check`` for the requested input source."""
    if args.data == "mnist":
        batch = args.batch_size or 1000
        x, y, batches = probe_inputs.mnist(args.data_dir, batch, args.seed)
        shape = probe_inputs.fit_shape(model, framework, x)
        steps = DEFAULT_DATA_STEPS if args.train_steps is None else args.train_steps
        return {
            "inputs": x.reshape((len(x),) + shape),
            "labels": y,
            "train_steps": steps,
            "train_batches": batches(shape),
            "source": "(MNIST test images)",
        }
    if args.input_shape is None:
        raise probe_inputs.InputError("give the probe input: --data mnist or --input-shape N,D,...")
    shape = probe_inputs.parse_shape(args.input_shape)
    if args.batch_size:
        shape = (args.batch_size,) + shape[1:]
    x = probe_inputs.random_inputs(shape, args.seed)
    return {
        "inputs": x,
        "train_steps": args.train_steps or 0,
        "source": "(standard normal)",
    }


def _check(args: argparse.Namespace) -> Report:
    from bnlab.doctor.api import check

    model = load_model(args.target)
    framework = _framework(model, args.framework)
    kwargs = _probe_data(args, model, framework)
    return check(model, framework=framework, lr=args.lr, **kwargs)


def run(args: argparse.Namespace) -> int:
    """Run ``bnlab doctor``; returns the exit status."""
    if args.train_steps is not None and args.train_steps < 0:
        return _fail("--train-steps must be 0 or more.")
    if args.batch_size is not None and args.batch_size < 1:
        return _fail("--batch-size must be 1 or more.")
    if not 0 <= args.seed < 2**32:  # numpy's global seed (Chainer's initializers) takes 32 bits
        return _fail(f"--seed must lie in [0, 2**32 - 1]; got {args.seed}.")
    if not (math.isfinite(args.lr) and args.lr > 0):
        return _fail(f"--lr must be a positive number; got {args.lr}.")
    _seed(args.seed)
    try:
        report = _check(args)
    except LoadError as err:
        return _fail(str(err))
    except ProbeError as err:
        return _fail(f"{err}. {err.hint}".rstrip() if err.hint else str(err))
    except UsageError as err:  # e.g. training without labels on a non-classifier
        return _fail(str(err))
    print(report.to_json() if args.json else report.to_text(), end="" if not args.json else "\n")
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    """``python -m bnlab.doctor``: the subcommand on its own, for testing."""
    parser = argparse.ArgumentParser(prog="bnlab doctor", description=DESCRIPTION)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse reports usage errors with status 2 already
        return int(exit_.code or 0)
    return run(args)
