"""``bnlab doctor FILE.py:NAME``: the command-line face of :func:`bnlab.doctor.check`.

Exit status: 0 when no finding is an error, 1 when one is, 2 for usage errors and for
models that cannot be loaded or run (the message says what to do).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.doctor import checkpoints, heap, shield, sources
from bnlab.doctor.backend import Backend
from bnlab.doctor.backends import BACKENDS, detect, seed_all
from bnlab.doctor.errors import InputError, ProbeError, UsageError
from bnlab.doctor.findings import FAIL_ON, Report, clean
from bnlab.doctor.loader import LoadError, load_model
from bnlab.errors import BnlabError
from bnlab.tflog import quiet_tensorflow_logging

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as the shell and `bnlab train` report it

# The doctor's training steps use Adam, whose step is about lr per weight: 10 is already far
# beyond any learning rate a model is trained with.
MAX_LR = 10.0
FORMATS = ("text", "json", "sarif")

DESCRIPTION = (
    "Find batch-normalization mistakes in your own model (a BN shared between layers, "
    "stale running statistics, train/eval divergence, momentum conventions...), each "
    "with the numbers that prove it. Exit 0: no error; 1: errors found (--fail-on picks "
    "the severity); 2: usage error."
)

# One MNIST epoch at batch 1000. Measured on the question's MLP (Adam lr 0.01): after 60
# steps the shared BN's call sites are ~0.8 SD apart and train/eval predictions differ
# for 6-12% of samples (1-3% with one BN per layer); eval accuracy falls below 0.80, as
# in the question, only after ~200-300 steps. Sharing itself is found with 0 steps.
DEFAULT_DATA_STEPS = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bnlab doctor``."""
    parser.add_argument(
        "target",
        metavar="TARGET",
        help="FILE.py:NAME (NAME: a model class or a zero-argument function "
        "returning a model), or a bnlab run directory (runs/question-seed0)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--input-shape",
        metavar="N,D,...",
        help="probe with standard-normal inputs of this shape, e.g. 1000,784 "
        "(training steps use other random batches); default: none, give "
        "this or --data (a run directory brings its own data set)",
    )
    source.add_argument(
        "--data",
        metavar="DATA",
        help="real data: mnist or fashion-mnist (training split for training "
        "steps and --fix, test split for the probe and the evaluation), or "
        "FILE.py:NAME returning (inputs, labels) batches, e.g. a DataLoader "
        "(the last sixth of its batches is held out for the probe), or a numpy "
        "file: FILE.npz with inputs and labels (keys x/y, X/Y, inputs/labels, "
        "images/labels or data/target; FILE.npz:X,Y names them) or FILE.npy with "
        "inputs only (enough to probe: --train-steps 0 or --checkpoint); one sixth "
        "of its samples is held out. The arrays are taken as the model's inputs "
        "unchanged except the cast to float32: uint8 images stay 0-255 (the "
        "built-in mnist is scaled to [0, 1]; divide by 255 before saving to match "
        "it). Read with allow_pickle=False, memory-mapped (default: none, or the "
        "data set of a run directory TARGET)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the MNIST files (default: as for `bnlab train`: "
        "$BNLAB_DATA_DIR, the copy shipped with bnlab, the user cache, a download)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="probe (and training) batch size with --data (default 1000); "
        "replaces the first dimension of --input-shape",
    )
    parser.add_argument(
        "--max-batches",
        type=int,
        default=sources.DEFAULT_MAX_BATCHES,
        help=f"batches read from --data FILE.py:NAME at most (kept in memory; default {sources.DEFAULT_MAX_BATCHES})",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        default=None,
        help="load trained weights into the model first: a state_dict saved with "
        "torch.save (loaded with weights_only=True), for Chainer a save_npz file, for "
        "Keras a .weights.h5 or .keras file, for Flax nnx a msgpack state written by "
        "flax.serialization.msgpack_serialize(nnx.state(model).to_pure_dict()) (msgpack: "
        "arrays only, no code runs; a linen model brings its variables: NAME returns "
        "(module, variables)) (default: none, the model's own initial weights)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help=f"optimizer steps on a copy before probing (Adam, cross-entropy; "
        f"default {DEFAULT_DATA_STEPS} with --data, 0 with --input-shape, "
        "0 for trained models: a run directory or --checkpoint)",
    )
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the training steps (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data order and inputs (default 0)")
    parser.add_argument(
        "--framework",
        choices=["auto", *BACKENDS],
        default="auto",
        help="framework of the model (default: auto, detected from the model)",
    )
    parser.add_argument(
        "--fix",
        metavar="OUT",
        default=None,
        help="write a repaired copy of the model to the folder OUT: every BN "
        "the doctor finds shared (error) split into one per call site, "
        "running statistics re-estimated over one pass of the training "
        "data; no retraining. Needs --data (default: no repair)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="let --fix replace the files of an earlier repair in OUT"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="how the report is printed on stdout: text, json (as --json) or sarif "
        "(SARIF 2.1.0 for code-scanning pages; docs/ci.md); default: text",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout (= --format json)")
    parser.add_argument(
        "--fail-on",
        choices=FAIL_ON,
        default="error",
        help="the least severe finding that makes the exit status 1: error, warning, "
        "info, or never (exit 0 whatever is found; 2 still means the model could not be "
        "checked); default: error",
    )


def _fail(message: str) -> int:
    print(f"bnlab doctor: {message}", file=sys.stderr)
    return EXIT_USAGE


def _seed(seed: int) -> None:
    """The CLI owns its process: seed everything that initialises or feeds the model."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)  # Chainer's initializers draw from numpy's global RNG
    seed_all(seed)


def _backend(model: Any, wanted: str) -> Backend:
    try:
        return detect(model, wanted)
    except UsageError as err:
        raise LoadError(str(err).replace("framework '", "--framework '")) from err


@dataclass
class Target:
    """The model to examine, and what the report calls it."""

    model: Any
    backend: Backend  # detected once, here
    name: str
    trained: bool  # weights from a checkpoint or a run directory
    dataset: str | None = None  # a run directory's data set
    notes: list[str] = field(default_factory=list)  # how the checkpoint was read, for the report


def _target(args: argparse.Namespace) -> Target:
    if checkpoints.is_run_dir(args.target):
        if args.checkpoint:
            raise InputError("--checkpoint is for FILE.py:NAME targets; a run directory brings its own checkpoint.pt.")
        model, cfg = checkpoints.load_run_dir(args.target)
        backend = _backend(model, args.framework)
        name = f"{args.target} (bnlab run: preset {cfg.preset}, seed {cfg.train.seed})"
        return Target(model, backend, name, True, cfg.dataset)
    model = load_model(args.target)
    backend = _backend(model, args.framework)
    notes: list[str] = []
    if args.checkpoint:
        model = backend.load_checkpoint(model, Path(args.checkpoint), notes)
    # "" keeps the probe's name; a framework's default name says less than the user's NAME
    name = "" if backend.has_own_name(model) else args.target.rpartition(":")[2]
    return Target(model, backend, name, bool(args.checkpoint), notes=notes)


def _train_steps(args: argparse.Namespace, target: Target, real: bool) -> int:
    if args.train_steps is not None:
        return int(args.train_steps)
    # A trained model is judged as handed over: our own steps would change what we judge.
    return DEFAULT_DATA_STEPS if real and not target.trained else 0


def _source(args: argparse.Namespace, target: Target) -> tuple[sources.Source, int]:
    data = args.data or (target.dataset if args.input_shape is None else None)
    if data is not None:
        data = sources.parse_data(data)
        steps = _train_steps(args, target, True)
        if data in sources.BUILTIN:
            src = sources.builtin_source(
                data, target.model, target.backend, args.data_dir, args.batch_size or 1000, args.seed
            )
        elif sources.is_array_file(data):
            labels_for = f"--train-steps {steps}" if steps else ("--fix" if args.fix else None)
            src = sources.array_source(
                data, target.model, target.backend, args.batch_size or 1000, args.seed, labels_for
            )
        else:
            src = sources.file_source(data, args.batch_size, args.max_batches)
        return src, steps
    if args.input_shape is None:
        raise InputError(
            "give the probe input: --data mnist, --data FILE.py:NAME or --input-shape N,D,... (or --data FILE.npz)"
        )
    shape = sources.parse_shape(args.input_shape)
    if args.batch_size:
        shape = (args.batch_size,) + shape[1:]
    steps = _train_steps(args, target, False)
    return sources.random_source(target.model, target.backend, shape, args.seed, steps), steps


def _data_note(src: sources.Source) -> str:
    return "batches used: " + "; ".join(f"{use}: {what}" for use, what in src.uses.items())


def _split_and_kept(report: Report) -> tuple[list[str], list[dict[str, Any]]]:
    """The BNs --fix splits (shared-bn errors) and those it leaves shared (warnings)."""
    split = [f.where for f in report.by_check("shared-bn") if f.severity == "error"]
    kept = [
        {
            "change": "kept",
            "where": f.where,
            "why": "shared, but its call sites see alike activations (a warning, not an error): left as it is",
        }
        for f in report.by_check("shared-bn")
        if f.severity != "error"
    ]
    return split, kept


def _factory_weights_note(target: str, steps: int) -> str:
    """--fix on FILE.py:NAME without --checkpoint: the repair took the weights NAME built
    (the doctor's training steps were on a copy, and are not kept)."""
    name = target.rpartition(":")[2]
    copy = f", not to the copy the checks trained for {steps} steps (that copy is not kept)" if steps else ""
    return (
        f"the repair was applied to the weights {name} returned{copy}. No --checkpoint was "
        f"given: unless {name} loads trained weights itself, these are its initial weights, "
        "and the numbers below say nothing about your trained model. To repair a trained "
        f"model, give --checkpoint PATH (or let {name} load its weights)."
    )


def _fix(args: argparse.Namespace, target: Target, src: sources.Source, report: Report) -> tuple[Any, list[Any]]:
    from bnlab.doctor import fix_output
    from bnlab.doctor.repair import repair_report

    assert src.fit_batches is not None and src.held_out is not None
    split, kept = _split_and_kept(report)
    result = repair_report(
        target.model,
        src.fit_batches(),
        src.held_out,
        split=split,
        framework=target.backend,
        evaluated_on=src.uses.get("evaluation (--fix)", ""),
    )
    result.changes += kept
    if not target.trained:
        result.notes.append(_factory_weights_note(args.target, int(report.probe.get("train_steps", 0))))
    config = getattr(result.model, "cfg", None)
    mlp_config = (
        dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else None
    )
    written = fix_output.write(
        result,
        target.backend,
        Path(args.fix),
        target=args.target,
        report=report.to_dict(),
        overwrite=args.overwrite,
        mlp_config=mlp_config,
    )
    return result, written


def _check(args: argparse.Namespace) -> tuple[Report, dict[str, Any], str]:
    from bnlab.doctor.api import check

    target = _target(args)
    if args.fix:
        from bnlab.doctor import fix_output
        from bnlab.doctor.repair import check_repairable

        fix_output.check_writable(Path(args.fix), target.backend, args.overwrite)
        check_repairable(target.model, target.backend)  # e.g. a subclassed Keras model
    src, steps = _source(args, target)
    if args.fix and not src.real:
        raise InputError(
            "--fix re-estimates running statistics on real training data and evaluates the "
            "repair on held-out data: give --data (mnist, fashion-mnist, FILE.npz or FILE.py:NAME) "
            "instead of --input-shape."
        )
    report = check(
        target.model,
        src.probe_x,
        labels=src.probe_y,
        train_steps=steps,
        train_batches=src.train_batches,
        framework=target.backend,
        lr=args.lr,
        source=src.description,
    )
    report.fail_on = args.fail_on  # now: the report --fix writes to repair.json states the real exit
    if target.name:
        report.model = target.name
    if steps == 0:  # no training steps were taken: don't list their batches
        src.uses.pop("training steps", None)
    if not args.fix:  # nothing was re-estimated or evaluated: don't list those batches either
        for use in [use for use in src.uses if use.endswith("(--fix)")]:
            del src.uses[use]
    report.notes += target.notes + [_data_note(src)]
    extra: dict[str, Any] = {"data": src.uses}
    text = ""
    if args.fix:
        result, written = _fix(args, target, src, report)
        extra["repair"] = {**result.to_dict(), "written": [str(p) for p in written]}
        text = "\n" + result.to_text() + "".join(f"  wrote {p}\n" for p in written)
    return report, extra, text


def _resolve_paths(args: argparse.Namespace) -> None:
    """Every path of the command line made absolute now, before the user's code runs: a
    model file that calls os.chdir at import must not move --fix OUT or a relative --data."""
    is_dir = checkpoints.is_run_dir(args.target)
    args.target = shield.absolute(args.target) if is_dir else shield.absolute_spec(args.target)
    if args.data is not None and sources.is_array_file(args.data):
        args.data = sources.absolute_array_spec(args.data)
    elif args.data is not None and args.data not in sources.BUILTIN:
        args.data = shield.absolute_spec(args.data)
    args.fix, args.checkpoint, args.data_dir = (shield.absolute(p) for p in (args.fix, args.checkpoint, args.data_dir))


def _interrupted(args: argparse.Namespace) -> int:
    """Ctrl-C: the doctor's own words (nothing of a run to resume; OUT whole or as it was)."""
    where = f" --fix {args.fix} is as it was: the repair's files appear together or not at all." if args.fix else ""
    _fail(f"interrupted; no report was printed.{where} Run the same command again to check the model.")
    return EXIT_INTERRUPTED


def run(args: argparse.Namespace) -> int:
    """Run ``bnlab doctor``; returns the exit status."""
    # This process only (never bnlab.doctor.check, which a notebook calls): a batch of 1000
    # small images makes activations above glibc's mmap threshold, mapped and unmapped every
    # step; keeping them cut system time from 35 s to 1 s on a 16-channel CNN (heap.py).
    heap.reuse_freed_memory()
    # Also this process only: TensorFlow's C++ INFO lines would fill stderr once the model
    # file imports keras or tensorflow (read once, at that import; a user's setting stands).
    quiet_tensorflow_logging()
    if args.train_steps is not None and args.train_steps < 0:
        return _fail("--train-steps must be 0 or more.")
    if args.batch_size is not None and args.batch_size < 1:
        return _fail("--batch-size must be 1 or more.")
    if args.max_batches < 1:
        return _fail("--max-batches must be 1 or more.")
    if not 0 <= args.seed < 2**32:  # numpy's global seed (Chainer's initializers) takes 32 bits
        return _fail(f"--seed must lie in [0, 2**32 - 1]; got {args.seed}.")
    if not (math.isfinite(args.lr) and 0 < args.lr <= MAX_LR):
        return _fail(
            f"--lr must be a positive number of at most {MAX_LR:g}; got {args.lr}. The doctor's "
            "training steps use Adam, which moves every weight by about lr per step whatever "
            "the gradient's scale: a larger lr wrecks the copy in one step, and its BN "
            "statistics would say nothing about your model."
        )
    if args.json and args.format not in (None, "json"):
        return _fail(f"--json means --format json; drop one of --json and --format {args.format}.")
    output = "json" if args.json else (args.format or "text")
    _resolve_paths(args)
    try:
        with shield.kept_cwd(), shield.prints_to_stderr(output != "text"):
            _seed(args.seed)  # imports the frameworks: seconds in which a Ctrl-C may come
            report, extra, fix_text = _check(args)
    except KeyboardInterrupt:
        return _interrupted(args)
    except ProbeError as err:
        _fail(f"{err}. {err.hint}".rstrip() if err.hint else str(err))
        return err.exit_code
    except BnlabError as err:  # a target that does not load, bad flags, run directories, OUT
        _fail(str(err))
        return err.exit_code
    if output == "json":
        print(json.dumps({**report.to_dict(), **clean(extra)}, indent=2, allow_nan=False))
    elif output == "sarif":
        print(json.dumps(_sarif(report, args), indent=2, allow_nan=False))
    else:
        print(report.to_text() + fix_text, end="")
    return report.exit_code


def _sarif(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    from bnlab import __version__
    from bnlab.doctor.locations import shown
    from bnlab.doctor.sarif import to_sarif

    target_file = None
    if not checkpoints.is_run_dir(args.target):
        # The target was made absolute before the user's code ran: shown relative to the
        # working directory again, as the findings' own file:line are.
        target_file = Path(shown(args.target.rpartition(":")[0])).as_posix()
    return to_sarif(report, target_file=target_file, tool_version=__version__)


def main(argv: list[str] | None = None) -> int:
    """``python -m bnlab.doctor``: the subcommand on its own, for testing."""
    parser = argparse.ArgumentParser(prog="bnlab doctor", description=DESCRIPTION)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse reports usage errors with status 2 already
        return int(exit_.code or 0)
    return run(args)
