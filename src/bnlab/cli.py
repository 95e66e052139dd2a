"""The ``bnlab`` command: a thin layer over the library API.

Each subcommand parses flags, calls one library function and turns its errors into a
one-paragraph message and an exit code (0 ok, 1 a failed check or run, 2 bad usage or input).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad flags or input: printed as one paragraph, exit code 2."""


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _number(kind: type, minimum: float, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a ``kind`` number >= ``minimum`` (> when ``strict``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if value < minimum or (strict and value == minimum) or value != value:
            bound = f"> {minimum}" if strict else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {value}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_positive_int = _number(int, 1)
_non_negative_int = _number(int, 0)
_positive_float = _number(float, 0.0, strict=True)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that trains (train, compare, repro)."""
    p.add_argument("--epochs", type=_positive_int, help="epochs per run (the seed: 100)")
    p.add_argument("--batch-size", type=_positive_int, help="minibatch size (the seed: 1000)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (alpha in Chainer)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto: CUDA when present)")
    p.add_argument("--threads", type=_non_negative_int,
                   help="torch threads per run (default 1: on small matrices one thread per process is fastest; 0 = torch's default)")
    p.add_argument("--engine", choices=["torch", "chainer", "tensorflow"],
                   help="training engine (chainer and tensorflow need the bnlab[chainer] / bnlab[tensorflow] extras)")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist", help="data set (default mnist)")
    p.add_argument("--data-dir", type=Path, help="folder holding the four IDX .gz files (default: BNLAB_DATA_DIR, the "
                   "repository's data/, the cache, then a download)")
    p.add_argument("--set", dest="overrides", type=_kv, action="append", default=[], metavar="FIELD=VALUE",
                   help="override any preset field, e.g. --set norm=shared --set bn_momentum=0.01 "
                        "--set widths=784,256,256,10 (see `bnlab presets --fields`)")


def run_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The run-config overrides implied by the common options."""
    overrides: dict[str, str] = {}
    for flag, field_name in [("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"),
                             ("device", "device"), ("threads", "threads"), ("engine", "engine")]:
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field_name] = str(value)
    overrides.update(dict(args.overrides))
    return overrides


# ---------------------------------------------------------------------------------- train

def cmd_train(args: argparse.Namespace) -> int:
    from bnlab.experiments import apply_overrides, get_preset
    from bnlab.train import train

    preset = get_preset(args.preset)
    overrides = run_overrides(args)
    if args.seed is not None:
        overrides["seed"] = str(args.seed)
    cfg = apply_overrides(preset.config, overrides)
    cfg = dataclasses.replace(cfg, dataset=args.dataset)
    out = args.out if args.out is not None else Path("runs") / f"{cfg.preset}-seed{cfg.train.seed}"
    echo = None if args.quiet else print
    if echo:
        print(f"# bnlab train --preset {cfg.preset} (seed {cfg.train.seed}, {cfg.train.epochs} epochs) -> {out}")
    result = train(cfg, data_dir=args.data_dir, out_dir=out, echo=echo)
    final = result.history[-1]
    print(f"final val/acc {final.val_acc:.4f}; run directory: {out}")
    return EXIT_OK


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one preset and print the seed's per-epoch table",
                       description="Train one preset on real MNIST, printing the seed's per-epoch table "
                       "(seconds per epoch in a trailing column), and save the run directory: config, "
                       "environment, history (JSON, CSV) and checkpoint.")
    p.add_argument("--preset", required=True, help="preset name (see `bnlab presets`)")
    p.add_argument("--seed", type=_non_negative_int, help="random seed for initial weights and batch order (default 0)")
    p.add_argument("--out", type=Path, help="run directory (default runs/PRESET-seedN)")
    p.add_argument("--quiet", action="store_true", help="do not print the per-epoch table")
    add_run_options(p)
    p.set_defaults(func=cmd_train)


# -------------------------------------------------------------------------------- presets

def cmd_presets(args: argparse.Namespace) -> int:
    from bnlab.experiments import MODEL_FIELDS, PRESETS, TRAIN_FIELDS

    if args.fields:
        print("Fields any preset can override with --set FIELD=VALUE:")
        for section, fields in (("model", MODEL_FIELDS), ("train", TRAIN_FIELDS)):
            for name, typ in fields.items():
                print(f"  {section}.{name}: {getattr(typ, '__name__', str(typ))}")
        return EXIT_OK
    for p in PRESETS.values():
        low, high = p.accept
        print(f"{p.name}\n  {p.description}\n  seed says: \"{p.seed_claim}\"\n"
              f"  reproduced when final val acc is in [{low:.3f}, {high:.3f}]: {p.accept_note}")
        if args.verbose:
            for section in ("model", "train"):
                values = dataclasses.asdict(getattr(p.config, section))
                print(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        print()
    return EXIT_OK


def add_presets_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the presets (every program in the seed) and the seed's claims",
                       description="List the presets with their description, the seed's claim and the band "
                       "bnlab accepts as reproduced.")
    p.add_argument("--verbose", "-v", action="store_true", help="also print every config field")
    p.add_argument("--fields", action="store_true", help="list the fields --set can override")
    p.set_defaults(func=cmd_presets)


# --------------------------------------------------------------------------------- doctor

def add_doctor_parser(sub) -> None:
    from bnlab.doctor import command

    p = sub.add_parser("doctor", help="find batch-norm misuse in your PyTorch or Chainer model",
                       description="Load a model from FILE.py:NAME (a model class or a zero-argument "
                       "callable), probe it, optionally after a few training steps on a copy, and report "
                       "BN misuse with evidence. Exit 0: no error-level finding; 1: errors found; 2: usage "
                       "error or the file does not import.")
    command.add_arguments(p)
    p.set_defaults(func=command.run)


# ---------------------------------------------------------------------- conventions, convert

def cmd_conventions(args: argparse.Namespace) -> int:
    from bnlab.conventions import CONVENTIONS, format_conventions_table

    if args.framework is None:
        print(format_conventions_table())
        return EXIT_OK
    c = CONVENTIONS[args.framework]
    for label, value in [("framework", c.name), ("layer", c.layer), ("rate", c.parameter),
                         ("weights", f"the {c.weights} value"), ("default", c.default),
                         ("eps default", c.eps_default), ("running var", c.running_var),
                         ("eval switch", c.eval_switch), ("update", c.update),
                         ("note", c.note or "-"), ("checked in", c.checked_in)]:
        print(f"{label + ':':<13} {value}")
    return EXIT_OK


def add_conventions_parser(sub) -> None:
    from bnlab.conventions import FRAMEWORKS

    p = sub.add_parser("conventions", help="table of BN conventions: Chainer, PyTorch, Keras 3, TF1, Flax",
                       description="Print, per framework, the running-average parameter's name, whether it "
                       "weights the old or the new value, its default, eps's default, biased or unbiased "
                       "running variance, and the switch to evaluation mode (docs/conventions.md explains).")
    p.add_argument("--framework", choices=FRAMEWORKS, help="print one framework's entry in full")
    p.set_defaults(func=cmd_conventions)


def cmd_convert(args: argparse.Namespace) -> int:
    from bnlab.conventions import CONVENTIONS, convert, format_rate, parameter_name

    source = CONVENTIONS[args.from_framework]
    given = [(flag, value) for flag, value in (("decay", args.decay), ("momentum", args.momentum))
             if value is not None]
    if len(given) != 1:
        raise UsageError(f"give the value to convert with exactly one flag: {source.name} states its "
                         f"running-average rate as {source.cli_flag}, e.g. `bnlab convert --from "
                         f"{source.framework} {source.cli_flag} {source.default:g} --to torch`.")
    flag, value = given[0]
    if flag != source.parameter:
        raise UsageError(f"{source.name} has no {flag!r}: its running-average rate is {source.cli_flag} "
                         f"(it weights the {source.weights} value). Run `bnlab convert --from "
                         f"{source.framework} {source.cli_flag} {value:g} --to {args.to_framework}`.")
    result = convert(value, source.framework, args.to_framework)
    print(f"{parameter_name(args.to_framework)}={format_rate(result)}")
    return EXIT_OK


def add_convert_parser(sub) -> None:
    from bnlab.conventions import FRAMEWORKS

    p = sub.add_parser("convert", help="convert a BN running-average rate between frameworks",
                       description="Convert a running-average rate between frameworks, e.g. `bnlab convert "
                       "--from chainer --decay 0.9 --to torch` prints momentum=0.1. Chainer takes --decay; "
                       "torch, keras, tf1 and flax take --momentum.")
    p.add_argument("--from", dest="from_framework", required=True, choices=FRAMEWORKS, help="framework of the value")
    p.add_argument("--to", dest="to_framework", required=True, choices=FRAMEWORKS, help="framework to state it in")
    p.add_argument("--decay", type=float, help="Chainer's decay (weight of the old value)")
    p.add_argument("--momentum", type=float, help="momentum of torch (new value) or keras/tf1/flax (old value)")
    p.set_defaults(func=cmd_convert)


# ------------------------------------------------------------------------- compare, repro

def add_sweep_options(p: argparse.ArgumentParser, *, out_default: str, seeds_default: str = "0-4") -> None:
    """Options of the commands that train many (preset, seed) runs in parallel."""
    p.add_argument("--seeds", default=seeds_default, help=f"seeds, e.g. 0-4 or 0,3,7-9 (default {seeds_default})")
    p.add_argument("--workers", type=_positive_int,
                   help="parallel worker processes (default: one per CPU core; measured fastest with 1 thread each)")
    p.add_argument("--out", type=Path, default=Path(out_default),
                   help="sweep directory: runs go to OUT/runs/PRESET/seedN, the report to OUT/report "
                        f"(default {out_default})")
    add_run_options(p)


def _run_sweep(args: argparse.Namespace, presets: list[str], on_done: Callable | None = None):
    """Plan, train (resuming) and report one sweep; returns (outcomes, report)."""
    from bnlab.data import load_dataset
    from bnlab.experiments import (DEFAULT_THREADS_PER_WORKER, LocalProcessExecutor, SweepProgress,
                                   finished_outcome, parse_seeds, plan_sweep, run_sweep)
    from bnlab.report import build_report

    seeds = parse_seeds(args.seeds)
    overrides = run_overrides(args)
    threads = args.threads if args.threads is not None else DEFAULT_THREADS_PER_WORKER
    overrides["threads"] = str(threads)
    specs = plan_sweep(presets, seeds, args.out, overrides, dataset=args.dataset, data_dir=args.data_dir)
    if any(finished_outcome(s) is None for s in specs):
        load_dataset(args.dataset, args.data_dir)  # find, verify or download once, before any worker starts
    progress = SweepProgress(specs)

    def on_event(event) -> None:
        progress(event)
        if event.kind == "done" and on_done is not None:
            on_done(event.outcome)

    try:
        outcomes = run_sweep(specs, LocalProcessExecutor(args.workers, threads), on_event)
    finally:
        progress.close()
    return outcomes, build_report([s.run_dir for s in specs], args.out / "report")


def _failures(outcomes) -> list[str]:
    return [f"{o.preset} seed {o.seed} {o.status}: {o.message}" for o in outcomes if o.status != "complete"]


def _finish_sweep(outcomes, report) -> int:
    print(f"\n{report.verdict_table()}\n\nreport: {report.html}")
    for line in _failures(outcomes):
        print(f"bnlab: {line}", file=sys.stderr)
    return EXIT_FAILED if _failures(outcomes) else EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from bnlab.experiments import SweepProgress, parse_presets
    from bnlab.report import STAT_COLUMNS, markdown_table, stats_rows

    def on_done(o) -> None:
        acc = f"final val acc {o.history[-1].val_acc:.4f}" if o.history else "no epoch finished"
        when = "finished earlier" if o.cached else f"{o.seconds:.1f} s"
        SweepProgress.write(f"{o.preset} seed {o.seed}: {o.status}, {acc} ({when})")

    outcomes, report = _run_sweep(args, parse_presets(args.presets), on_done)
    print("\n" + markdown_table(STAT_COLUMNS, stats_rows(report.summaries)))
    return _finish_sweep(outcomes, report)


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="train presets x seeds in parallel and report statistics",
                       description="Train every (preset, seed) run in parallel worker processes with one progress "
                       "bar, resuming: runs already complete in OUT are not trained again, interrupted ones restart "
                       "from scratch. Ends with per-preset statistics (mean, sd, 95% CI) and OUT/report/report.html. "
                       "Exit 0 when every run completed, 1 if one diverged or failed.")
    p.add_argument("--presets", required=True, help="comma-separated preset names, or all (see `bnlab presets`)")
    add_sweep_options(p, out_default="runs/compare")
    p.set_defaults(func=cmd_compare)


def cmd_repro(args: argparse.Namespace) -> int:
    from bnlab.experiments import InOrder, SweepProgress, get_preset, parse_presets, parse_seeds
    from bnlab.train import format_table

    presets, seeds = parse_presets(args.presets), parse_seeds(args.seeds)

    def emit(o) -> None:
        note = "" if o.status == "complete" else f"\n{o.status}: {o.message}"
        SweepProgress.write(f"== {o.preset} seed {o.seed} ==\n{format_table(o.history)}{note}\n")

    # Runs finish in any order; their tables print in (preset, seed) order.
    in_order = InOrder([(p, s) for p in presets for s in seeds], emit)
    outcomes, report = _run_sweep(args, presets, lambda o: in_order.add((o.preset, o.seed), o))
    for v in report.verdicts:
        measured = ("no complete run" if v.value is None else
                    f"final val acc {v.value:.4f} (mean of {v.n} seed(s); {v.seeds_in_band} of {v.n} in the band)")
        differ = " (these runs' settings differ from the seed's program)" if v.deviations else ""
        print(f"{v.preset}: {measured}; the seed says \"{get_preset(v.preset).seed_claim}\"; {v.label}{differ}")
    return _finish_sweep(outcomes, report)


def add_repro_parser(sub) -> None:
    p = sub.add_parser("repro", help="reproduce the seed's story: every preset, 5 seeds, verdicts and a report",
                       description="Train every preset of the seed (question, question-first-snippet, answer, no-bn, "
                       "tensorflow, tensorflow-no-bn) for each seed, print each run's per-epoch table in the seed's "
                       "format, then each preset's mean final val acc against the seed's claim, the verdict table "
                       "and the report path. Resumable like `bnlab compare`. Exit 0 when every run completed "
                       "(verdicts are data, not errors), 1 if a run diverged or failed.")
    p.add_argument("--presets", default="all", help="comma-separated preset names (default all)")
    add_sweep_options(p, out_default="runs/repro")
    p.set_defaults(func=cmd_repro)


# ------------------------------------------------------------------------------- assembly

# Each builder adds one subcommand; order is the order of `bnlab --help`.
PARSER_BUILDERS: list[Callable] = [add_train_parser, add_presets_parser, add_doctor_parser]
PARSER_BUILDERS.extend([add_conventions_parser, add_convert_parser])
PARSER_BUILDERS.extend([add_compare_parser, add_repro_parser])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Reproduce, diagnose and explain batch normalization: train the seed's MNIST "
                    "programs, find BN misuse in your model, compare frameworks' conventions.")
    from bnlab import __version__

    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for builder in PARSER_BUILDERS:
        builder(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("bnlab: interrupted; finished runs are saved, rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every error ends as one paragraph and an exit code
        return _report_error(err)


def _report_error(err: Exception) -> int:
    from bnlab.train import TrainingDiverged

    data_error = _data_error_class()
    if isinstance(err, TrainingDiverged):
        print(f"bnlab: {err}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(err, (UsageError, ValueError)) or (data_error and isinstance(err, data_error)):
        print(f"bnlab: {err}", file=sys.stderr)
        return EXIT_USAGE
    raise err


def _data_error_class():
    try:
        from bnlab.data import DataError
    except ImportError:
        return None
    return DataError


if __name__ == "__main__":
    raise SystemExit(main())
