"""The ``bnlab`` command: a thin layer over the library API.

Each subcommand parses flags, calls one library function and prints its result (text, or
JSON with ``--json``). Errors map by class (``bnlab.errors``): a BnlabError is printed as
its one paragraph with its exit code (2 bad usage or input, 1 a failed check or run); any
other exception is a bug and keeps its traceback (exit 1). Importing this module imports
neither torch nor any framework: ``bnlab --help``, ``presets`` and ``convert`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bnlab.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, BnlabError, UsageError


class HelpFormatter(argparse.HelpFormatter):
    """Wraps the description to the terminal, keeps the examples' line breaks, and shows
    each option's default when it has one and its help does not state it already."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and action.option_strings
            and default not in (None, False, [], argparse.SUPPRESS)
            and not isinstance(action, argparse._HelpAction)
        ):
            text += " (default: %(default)s)"
        return text


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_parser(
    sub: Any, name: str, *, help: str, description: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=description, epilog=_examples(*examples), formatter_class=HelpFormatter
    )


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return key.strip(), value


def _parse_as(kind: type) -> Callable[[str], Any]:
    """An argparse type that parses a number (its range is the config's to check)."""

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_int, _float = _parse_as(int), _parse_as(float)


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (progress goes to stderr)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that trains (train, compare, repro)."""
    p.add_argument("--epochs", type=_int, help="epochs per run (default: the preset's; the question: 100)")
    p.add_argument("--batch-size", type=_int, help="minibatch size (default: the preset's; the question: 1000)")
    p.add_argument(
        "--lr", type=_float, help="Adam learning rate, alpha in Chainer (default: the preset's; the question: 0.01)"
    )
    p.add_argument("--device", help="where to train: auto (CUDA when present), cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--threads",
        type=_int,
        help="threads per run (default 1: on these small matrices one thread per process is fastest; "
        "0 keeps the framework's default)",
    )
    p.add_argument(
        "--engine",
        choices=["torch", "chainer", "tensorflow"],
        help="training engine (default torch; chainer and tensorflow need the bnlab[chainer] / "
        "bnlab[tensorflow] extras)",
    )
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist", help="data set")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="folder holding the four IDX .gz files (default: $BNLAB_DATA_DIR, "
        "the MNIST copy shipped with bnlab, the user cache, then a download)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        type=_kv,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any preset field, e.g. --set norm=shared --set bn_momentum=0.01 "
        "--set widths=784,256,256,10 (see `bnlab presets --fields`; default: none, the "
        "preset as it is)",
    )


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config overrides implied by the common options, typed (``--set`` values
    stay strings: the config parses them by the field's type)."""
    overrides: dict[str, Any] = {}
    for flag in ("epochs", "batch_size", "lr", "device", "threads", "engine"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[flag] = value
    overrides.update(dict(args.overrides))
    return overrides


def _print_json(obj: Any) -> None:
    from bnlab.jsonsafe import json_safe

    print(json.dumps(json_safe(obj), indent=2))


def _status(text: str) -> None:
    """Progress and notes: to stderr, so that stdout holds only the result."""
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- train


class EpochPrinter:
    """The question's table, row by row as epochs finish, with seconds, epoch i/N and the
    ETA in trailing columns under their own headers."""

    def __init__(self, epochs: int, out: Any) -> None:
        from bnlab.table import table_header

        self.epochs = epochs
        self.out = out
        self._first_done: float | None = None  # when the first epoch of this process ended
        self._first_seconds = 0.0
        self._rows = 0
        print(f"{table_header(seconds=True)}  {'epoch':>9}  {'ETA':>7}", file=out, flush=True)

    def eta(self, done: int, epoch_seconds: float, now: float) -> float:
        """Seconds left after ``done`` of the epochs: the mean epoch time so far times the
        epochs left. The first epoch counts by its own duration, not since the command
        started (importing torch and reading the data are not epochs)."""
        self._rows += 1
        if self._first_done is None:
            self._first_done, self._first_seconds = now, epoch_seconds
        per_epoch = (self._first_seconds + now - self._first_done) / self._rows
        return per_epoch * (self.epochs - done)

    def __call__(self, rec: Any) -> None:
        from bnlab.table import format_row

        done = rec.epoch + 1
        eta = self.eta(done, rec.seconds, time.perf_counter())
        print(
            f"{format_row(rec, seconds=True)}  {f'{done}/{self.epochs}':>9}  {_clock(eta):>7}",
            file=self.out,
            flush=True,
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from bnlab.config import apply_overrides
    from bnlab.engines import train
    from bnlab.presets import get_preset

    preset = get_preset(args.preset)
    overrides = run_overrides(args)
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = dataclasses.replace(apply_overrides(preset.config, overrides), dataset=args.dataset)
    out = args.out if args.out is not None else Path("runs") / f"{cfg.preset}-seed{cfg.train.seed}"
    table_to = sys.stderr if args.json else sys.stdout
    if not args.quiet:
        print(
            f"# bnlab train --preset {cfg.preset} (seed {cfg.train.seed}, {cfg.train.epochs} epochs, "
            f"{cfg.train.engine} engine) -> {out}",
            file=table_to,
            flush=True,
        )
    printer = None if args.quiet else EpochPrinter(cfg.train.epochs, table_to)
    try:
        result = train(cfg, data_dir=args.data_dir, out_dir=out, echo=None, on_epoch=printer, overwrite=args.overwrite)
    except KeyboardInterrupt:
        _status(
            f"bnlab: interrupted; {out} keeps the finished epochs, marked interrupted. A run does not "
            f"resume: `bnlab train ... --out {out} --overwrite` trains it again from epoch 0."
        )
        return 130
    final = result.history[-1]
    if args.json:
        _print_json(
            {
                "run_dir": str(out),
                "config": cfg.to_dict(),
                "final": dataclasses.asdict(final),
                "history": [dataclasses.asdict(r) for r in result.history],
            }
        )
    else:
        print(f"final val/acc {final.val_acc:.4f}; run directory: {out}")
    return EXIT_OK


def add_train_parser(sub: Any) -> None:
    p = _add_parser(
        sub,
        "train",
        help="train one preset and print the question's per-epoch table",
        description="Train one preset on real MNIST, printing the question's per-epoch table (with "
        "seconds, epoch i/N and the ETA in trailing columns), and save the run directory: config, "
        "environment, history (JSON, CSV) and checkpoint. A run directory that already holds a run "
        "is not overwritten unless --overwrite is given; an interrupted run restarts from epoch 0.",
        examples=[
            "bnlab train --preset answer --seed 1",
            "bnlab train --preset question --set norm=per-layer --epochs 20",
            "bnlab train --preset tensorflow --engine torch --json > result.json",
        ],
    )
    p.add_argument("--preset", required=True, help="preset name (see `bnlab presets`); required")
    p.add_argument("--seed", type=_int, help="random seed for initial weights and batch order (default 0)")
    p.add_argument("--out", type=Path, help="run directory (default runs/PRESET-seedN)")
    p.add_argument("--overwrite", action="store_true", help="train again into a run directory that holds a run")
    p.add_argument("--quiet", action="store_true", help="do not print the per-epoch table")
    _add_json(p)
    add_run_options(p)
    p.set_defaults(func=cmd_train)


# -------------------------------------------------------------------------------- presets


def cmd_presets(args: argparse.Namespace) -> int:
    import dataclasses

    from bnlab.config import MODEL_FIELDS, TRAIN_FIELDS, type_name
    from bnlab.presets import PRESETS

    if args.fields:
        fields = {
            f"{section}.{name}": type_name(typ)
            for section, table in (("model", MODEL_FIELDS), ("train", TRAIN_FIELDS))
            for name, typ in table.items()
        }
        if args.json:
            _print_json(fields)
            return EXIT_OK
        print("Fields any preset can override with --set FIELD=VALUE:")
        for name, typ in fields.items():
            print(f"  {name}: {typ}")
        return EXIT_OK
    if args.json:
        _print_json(
            {
                p.name: {
                    "description": p.description,
                    "claim": p.claim,
                    "accept": list(p.accept),
                    "accept_note": p.accept_note,
                    "config": p.config.to_dict(),
                }
                for p in PRESETS.values()
            }
        )
        return EXIT_OK
    for p in PRESETS.values():
        low, high = p.accept
        print(
            f'{p.name}\n  {p.description}\n  the question/answer says: "{p.claim}"\n'
            f"  reproduced when final val acc is in [{low:.3f}, {high:.3f}]: {p.accept_note}"
        )
        if args.verbose:
            for section in ("model", "train"):
                values = dataclasses.asdict(getattr(p.config, section))
                print(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        print()
    return EXIT_OK


def add_presets_parser(sub: Any) -> None:
    p = _add_parser(
        sub,
        "presets",
        help="list the presets (every program of the question and answer) and their claims",
        description="List the presets with their description, what the question or answer claims "
        "about them and the band bnlab accepts as reproduced.",
        examples=["bnlab presets", "bnlab presets --verbose", "bnlab presets --fields"],
    )
    p.add_argument("--verbose", "-v", action="store_true", help="also print every config field")
    p.add_argument("--fields", action="store_true", help="list the fields --set can override")
    _add_json(p)
    p.set_defaults(func=cmd_presets)


# --------------------------------------------------------------------------------- doctor


def add_doctor_parser(sub: Any) -> None:
    from bnlab.doctor import command

    p = _add_parser(
        sub,
        "doctor",
        help="find batch-norm misuse in your PyTorch or Chainer model",
        description="Load a model from FILE.py:NAME (a model class or a zero-argument callable), probe "
        "it, optionally after a few training steps on a copy, and report BN misuse with evidence. "
        "Exit 0: no error-level finding; 1: errors found; 2: usage error or the file does not import.",
        examples=[
            "bnlab doctor examples/question_torch.py:MyModel --data mnist",
            "bnlab doctor my_model.py:Net --input-shape 64,3,32,32 --json",
        ],
    )
    command.add_arguments(p)
    p.set_defaults(func=command.run)


# ---------------------------------------------------------------------- conventions, convert


def cmd_conventions(args: argparse.Namespace) -> int:
    from bnlab.conventions import CONVENTIONS, format_conventions_table

    if args.json:
        _print_json({k: dict(c.__dict__) for k, c in CONVENTIONS.items()})
        return EXIT_OK
    if args.framework is None:
        print(format_conventions_table())
        return EXIT_OK
    c = CONVENTIONS[args.framework]
    for label, value in [
        ("framework", c.name),
        ("layer", c.layer),
        ("rate", c.parameter),
        ("weights", f"the {c.weights} value"),
        ("default", c.default),
        ("eps default", c.eps_default),
        ("running var", c.running_var),
        ("eval switch", c.eval_switch),
        ("update", c.update),
        ("note", c.note or "-"),
        ("checked in", c.checked_in),
    ]:
        print(f"{label + ':':<13} {value}")
    return EXIT_OK


def add_conventions_parser(sub: Any) -> None:
    from bnlab.conventions import FRAMEWORKS

    p = _add_parser(
        sub,
        "conventions",
        help="table of BN conventions: Chainer, PyTorch, Keras 3, TF1, Flax",
        description="Print, per framework, the running-average parameter's name, whether it weights "
        "the old or the new value, its default, eps's default, biased or unbiased running variance, "
        "and the switch to evaluation mode (docs/conventions.md explains).",
        examples=["bnlab conventions", "bnlab conventions --framework keras"],
    )
    p.add_argument(
        "--framework", choices=FRAMEWORKS, help="print one framework's entry in full (default: the table of all)"
    )
    _add_json(p)
    p.set_defaults(func=cmd_conventions)


def cmd_convert(args: argparse.Namespace) -> int:
    from bnlab.conventions import CONVENTIONS, convert, format_rate, parameter_name

    source = CONVENTIONS[args.from_framework]
    given = [(flag, value) for flag, value in (("decay", args.decay), ("momentum", args.momentum)) if value is not None]
    if len(given) != 1:
        raise UsageError(
            f"give the value to convert with exactly one flag: {source.name} states its "
            f"running-average rate as {source.cli_flag}, e.g. `bnlab convert --from "
            f"{source.framework} {source.cli_flag} {source.default:g} --to torch`."
        )
    flag, value = given[0]
    if flag != source.parameter:
        raise UsageError(
            f"{source.name} has no {flag!r}: its running-average rate is {source.cli_flag} "
            f"(it weights the {source.weights} value). Run `bnlab convert --from "
            f"{source.framework} {source.cli_flag} {value:g} --to {args.to_framework}`."
        )
    result = convert(value, source.framework, args.to_framework)
    if args.json:
        _print_json(
            {
                "from": args.from_framework,
                flag: value,
                "to": args.to_framework,
                parameter_name(args.to_framework): result,
            }
        )
    else:
        print(f"{parameter_name(args.to_framework)}={format_rate(result)}")
    return EXIT_OK


def add_convert_parser(sub: Any) -> None:
    from bnlab.conventions import FRAMEWORKS

    p = _add_parser(
        sub,
        "convert",
        help="convert a BN running-average rate between frameworks",
        description="Convert a running-average rate between frameworks. Chainer takes --decay; torch, "
        "keras, tf1 and flax take --momentum.",
        examples=[
            "bnlab convert --from chainer --decay 0.9 --to torch      # momentum=0.1",
            "bnlab convert --from keras --momentum 0.99 --to torch    # momentum=0.01",
        ],
    )
    p.add_argument("--from", dest="from_framework", required=True, choices=FRAMEWORKS, help="framework of the value")
    p.add_argument("--to", dest="to_framework", required=True, choices=FRAMEWORKS, help="framework to state it in")
    p.add_argument(
        "--decay", type=_float, help="Chainer's decay (weight of the old value); give it or --momentum (no default)"
    )
    p.add_argument(
        "--momentum",
        type=_float,
        help="momentum of torch (new value) or keras/tf1/flax (old value); give it or --decay (no default)",
    )
    _add_json(p)
    p.set_defaults(func=cmd_convert)


# ------------------------------------------------------------------------- compare, repro


def add_sweep_options(p: argparse.ArgumentParser, *, out_default: str, seeds_default: str = "0-4") -> None:
    """Options of the commands that train many (preset, seed) runs in parallel."""
    p.add_argument("--seeds", default=seeds_default, help="random seeds, e.g. 0-4 or 0,3,7-9")
    p.add_argument(
        "--workers",
        type=_int,
        help="parallel worker processes (default: one per CPU core; measured fastest with 1 thread each)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(out_default),
        help="sweep directory: runs go to OUT/runs/PRESET/seedN, the report to OUT/report",
    )
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="where the runs train: local worker processes, or the tasks of a Ray cluster "
        "(the bnlab[ray] extra; a local one unless --ray-address)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="join this running Ray cluster (HOST:PORT, or auto) instead of starting a "
        "local one (the default); its nodes need bnlab and the data, and OUT on a file system they share",
    )
    _add_json(p)
    add_run_options(p)


def _executor(args: argparse.Namespace, threads: int) -> Any:
    """The executor --executor names (None: compare's default, local processes)."""
    if args.ray_address is not None and args.executor != "ray":
        raise UsageError("--ray-address needs --executor ray.")
    if args.executor != "ray":
        return None
    from bnlab.ray_executor import RayExecutor

    return RayExecutor(workers=args.workers, threads=threads, address=args.ray_address)


def _run_sweep(
    args: argparse.Namespace,
    presets: list[str],
    on_done: Callable[[Any], None] | None = None,
    grid: Sequence[Any] | None = None,
    extra_results: Callable[[Any, Any, Callable[[str], None]], list] | None = None,
) -> tuple:
    """Plan, train (resuming) and report one sweep with a progress bar; (outcomes, report).
    ``grid``: the axes (default: parsed from --grid); ``extra_results(specs, outcomes,
    on_stage)``: more results for a grid report (the sharing study's repairs)."""
    from bnlab.comparison import compare
    from bnlab.config import parse_seeds
    from bnlab.grid import parse_axis
    from bnlab.sweep import DEFAULT_THREADS_PER_WORKER, SweepProgress

    seeds = parse_seeds(args.seeds)
    if grid is None:
        grid = [parse_axis(text) for text in getattr(args, "grid", None) or []]
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be 1 or more; got {args.workers}.")
    threads = args.threads if args.threads is not None else DEFAULT_THREADS_PER_WORKER
    overrides = {k: v for k, v in run_overrides(args).items() if k != "threads"}
    progress: SweepProgress | None = None

    def on_plan(specs: list) -> None:
        nonlocal progress
        progress = SweepProgress(len(specs), sum(s.config.train.epochs for s in specs))

    started = time.perf_counter()

    def on_stage(text: str) -> None:
        # The clock says how long each stage took (the report's figures take seconds each).
        line = f"bnlab [{_clock(time.perf_counter() - started)}] {text}"
        (progress.note if progress else _status)(line)

    def on_event(event: Any) -> None:
        if progress is not None:
            progress(event)
        if event.kind == "done" and on_done is not None:
            on_done(event.outcome)

    points = 1
    for axis in grid:
        points *= len(axis.values)
    shape = f" x {points} grid point(s)" if grid else ""
    _status(f"bnlab: {len(presets)} preset(s){shape} x {len(seeds)} seed(s) -> {args.out}")
    executor = _executor(args, threads)
    try:
        return compare(
            presets,
            seeds,
            args.out,
            overrides,
            dataset=args.dataset,
            data_dir=args.data_dir,
            workers=args.workers,
            threads=threads,
            executor=executor,
            on_event=on_event,
            on_stage=on_stage,
            on_plan=on_plan,
            grid=grid,
            extra_results=None
            if extra_results is None
            else (lambda specs, outcomes: extra_results(specs, outcomes, on_stage)),
        )
    finally:
        if progress is not None:
            progress.close()


def _failures(outcomes: Sequence[Any]) -> list[str]:
    return [f"{o.label} {o.status}: {o.message}" for o in outcomes if o.status != "complete"]


def _sweep_json(outcomes: Sequence[Any], report: Any) -> dict[str, Any]:
    summary = json.loads(report.json.read_text())
    summary["runs"] = [
        {
            "preset": o.preset,
            "seed": o.seed,
            "label": o.label,
            "status": o.status,
            "run_dir": str(o.run_dir),
            "message": o.message,
            "final_val_acc": o.history[-1].val_acc if o.history else None,
            "cached": o.cached,
        }
        for o in outcomes
    ]
    summary["report"] = str(report.html)
    return summary


def _finish_sweep(args: argparse.Namespace, outcomes: Sequence[Any], report: Any, text: str) -> int:
    if args.json:
        _print_json(_sweep_json(outcomes, report))
    else:
        print(f"{text}\n\nreport: {report.html}")
    for line in _failures(outcomes):
        _status(f"bnlab: {line}")
    return EXIT_FAILED if _failures(outcomes) else EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from bnlab.presets import parse_presets
    from bnlab.report import CLIP_NOTE, STAT_COLUMNS, stats_rows
    from bnlab.report_format import markdown_table

    outcomes, report = _run_sweep(args, parse_presets(args.presets), _print_outcome(args))
    if args.grid:
        table = report.stats_table()
    else:
        table = markdown_table(STAT_COLUMNS, stats_rows(report.summaries)) + f"\n\n{CLIP_NOTE}"
    return _finish_sweep(args, outcomes, report, table)


def _print_outcome(args: argparse.Namespace) -> Callable[[Any], None]:
    from bnlab.sweep import SweepProgress

    def on_done(o: Any) -> None:
        acc = f"final val acc {o.history[-1].val_acc:.4f}" if o.history else "no epoch finished"
        when = "finished earlier" if o.cached else f"{o.seconds:.1f} s"
        SweepProgress.write(f"{o.label}: {o.status}, {acc} ({when})", file=sys.stderr if args.json else sys.stdout)

    return on_done


def cmd_study(args: argparse.Namespace) -> int:
    from bnlab.grid import format_value, parse_axis
    from bnlab.report_format import markdown_table
    from bnlab.study import SHARING_PRESETS, repaired_results

    repairs: list[Any] = []

    def repair(specs: Any, outcomes: Any, on_stage: Callable[[str], None]) -> list:
        repairs.extend(repaired_results(specs, outcomes, args.out, data_dir=args.data_dir, on_stage=on_stage))
        return repairs

    axes = [parse_axis(f"model.bn_momentum={args.momenta}"), parse_axis(f"train.batch_size={args.batch_sizes}")]
    outcomes, report = _run_sweep(args, list(SHARING_PRESETS), _print_outcome(args), grid=axes, extra_results=repair)
    by_series = {(c.series, c.point): c.stats["final_val_acc"] for c in report.cells}
    rows = []
    for point in dict.fromkeys(c.point for c in report.cells):
        values = dict(point)
        cells = [
            by_series.get((series, point)) for series in ("question", repairs[0].series if repairs else "", "answer")
        ]
        rows.append(
            [
                format_value(values["model.bn_momentum"]),
                f"{1 - values['model.bn_momentum']:g}",
                format_value(values["train.batch_size"]),
                *("-" if s is None or not s.n else f"{s.mean:.4f} (n={s.n}, {s.min:.4f}-{s.max:.4f})" for s in cells),
            ]
        )
    header = (
        "bn_momentum (PyTorch)",
        "Chainer decay",
        "batch size",
        "shared BN (question)",
        "shared, repaired by the doctor",
        "per-layer BN (answer)",
    )
    return _finish_sweep(args, outcomes, report, markdown_table(header, rows))


def add_study_parser(sub: Any) -> None:
    p = _add_parser(
        sub,
        "study",
        help="run a study: 'sharing' = when does one shared BN hurt, does the repair cure it",
        description="sharing: the question (one BN shared by both hidden layers) against the answer (one "
        "BN per layer) over Chainer decay 0.5/0.9/0.99 (PyTorch momentum 0.5/0.1/0.01) x batch size "
        "100/1000, and for every shared run the val acc after the doctor's repair (bnlab.doctor.repair: "
        "the BN split per call site, statistics re-estimated, no retraining). It is `bnlab compare "
        "--presets question,answer --grid bn_momentum=0.5,0.1,0.01 --grid batch_size=100,1000` plus "
        "the repairs; resumable, with the grid report in OUT/report.",
        examples=[
            "bnlab study sharing                       # seeds 0-2, 100 epochs",
            "bnlab study sharing --seeds 0-1 --epochs 20 --out runs/sharing-20",
        ],
    )
    p.add_argument("study", choices=["sharing"], help="the study to run")
    p.add_argument(
        "--momenta",
        default="0.5,0.1,0.01",
        help="BN momenta of the grid, PyTorch convention (Chainer decay = 1 - momentum)",
    )
    p.add_argument("--batch-sizes", default="100,1000", help="batch sizes of the grid")
    add_sweep_options(p, out_default="runs/study-sharing", seeds_default="0-2")
    p.set_defaults(func=cmd_study)


def add_compare_parser(sub: Any) -> None:
    p = _add_parser(
        sub,
        "compare",
        help="train presets x seeds in parallel and report statistics",
        description="Train every (preset, seed) run in parallel worker processes with one progress bar, "
        "resuming: runs already complete in OUT are not trained again, interrupted ones restart from "
        "epoch 0. Ends with per-preset statistics (mean, sd, 95% CI) and OUT/report/report.html. One "
        "process at a time owns OUT. Exit 0 when every run completed, 1 if one diverged or failed.",
        examples=[
            "bnlab compare --presets question,answer --seeds 0-9",
            "bnlab compare --presets answer --seeds 0-4 --set bn_momentum=0.01 --out runs/m",
            "bnlab compare --presets all --seeds 0-2 --epochs 20 --json > summary.json",
            "bnlab compare --presets question,answer --seeds 0-4 --out runs/grid \\\n"
            "      --grid bn_momentum=0.01,0.1,0.5 --grid batch_size=100,1000",
        ],
    )
    p.add_argument(
        "--presets", required=True, help="comma-separated preset names, or all (see `bnlab presets`); required"
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FIELD=V1,V2,...",
        help="vary a field over values (any field --set accepts; repeat for more axes): every grid "
        "point x preset x seed is one run, in OUT/runs/PRESET/FIELD-V__FIELD-V/seedN; the report "
        "plots final val acc against each axis and, for two axes, a heat map. A field holding a "
        "list separates its values with ';' (--grid 'widths=784,100,100,10;784,256,256,10'); default: no grid",
    )
    add_sweep_options(p, out_default="runs/compare")
    p.set_defaults(func=cmd_compare)


def cmd_repro(args: argparse.Namespace) -> int:
    from bnlab.config import parse_seeds
    from bnlab.presets import get_preset, parse_presets
    from bnlab.sweep import InOrder, SweepProgress
    from bnlab.table import format_table

    presets, seeds = parse_presets(args.presets), parse_seeds(args.seeds)
    tables_to = sys.stderr if args.json else sys.stdout

    def emit(o: Any) -> None:
        note = "" if o.status == "complete" else f"\n{o.status}: {o.message}"
        SweepProgress.write(f"== {o.preset} seed {o.seed} ==\n{format_table(o.history)}{note}\n", file=tables_to)

    # Runs finish in any order; their tables print in (preset, seed) order.
    in_order = InOrder([(p, s) for p in presets for s in seeds], emit)
    outcomes, report = _run_sweep(args, presets, lambda o: in_order.add((o.preset, o.seed), o))
    lines = []
    for v in report.verdicts:
        measured = (
            "no complete run"
            if v.value is None
            else f"final val acc {v.value:.4f} (mean of {v.n} seed(s); {v.seeds_in_band} of {v.n} in the band)"
        )
        differ = " (these runs' settings differ from the original program)" if v.deviations else ""
        caveat = f" [{v.caveat}]" if v.caveat else ""
        lines.append(
            f'{v.preset}: {measured}; the question/answer says "{get_preset(v.preset).claim}"; '
            f"{v.label}{differ}{caveat}"
        )
    return _finish_sweep(args, outcomes, report, "\n".join(lines) + "\n\n" + report.verdict_table())


def add_repro_parser(sub: Any) -> None:
    p = _add_parser(
        sub,
        "repro",
        help="reproduce the question's story: every preset, 5 seeds, verdicts and a report",
        description="Train every preset (question, question-first-snippet, answer, no-bn, tensorflow, "
        "tensorflow-no-bn) for each seed, print each run's per-epoch table in the question's format, "
        "then each preset's mean final val acc against the claim, the verdict table and the report "
        "path. Resumable like `bnlab compare`. Exit 0 when every run completed (verdicts are data, "
        "not errors), 1 if a run diverged or failed.",
        examples=[
            "bnlab repro                      # every preset, seeds 0-4, 100 epochs",
            "bnlab repro --seeds 0 --out runs/demo",
            "bnlab repro --presets question,answer --engine chainer",
        ],
    )
    p.add_argument("--presets", default="all", help="comma-separated preset names")
    add_sweep_options(p, out_default="runs/repro")
    p.set_defaults(func=cmd_repro)


# ------------------------------------------------------------------------------- assembly

# Each builder adds one subcommand; order is the order of `bnlab --help`.
PARSER_BUILDERS: list[Callable[[Any], None]] = [
    add_train_parser,
    add_presets_parser,
    add_doctor_parser,
    add_conventions_parser,
    add_convert_parser,
    add_compare_parser,
    add_repro_parser,
    add_study_parser,
]


def build_parser() -> argparse.ArgumentParser:
    from bnlab import __version__

    parser = argparse.ArgumentParser(
        prog="bnlab",
        formatter_class=HelpFormatter,
        description="Reproduce, diagnose and explain batch normalization: train the programs of a real "
        "question about BN in Chainer vs TensorFlow on MNIST, find BN misuse in your own model, "
        "compare frameworks' conventions.",
        epilog=_examples(
            "bnlab repro --seeds 0 --out runs/demo",
            "bnlab train --preset answer --seed 1",
            "bnlab doctor my_model.py:Net --data mnist",
            "bnlab convert --from chainer --decay 0.9 --to torch",
        ),
    )
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
        return int(args.func(args))
    except KeyboardInterrupt:
        _status(
            "bnlab: interrupted; finished runs are saved. Rerun the same command to resume: finished runs "
            "are kept, interrupted runs start again from epoch 0."
        )
        return 130
    except BnlabError as err:
        _status(f"bnlab: {err}")
        return err.exit_code
    except Exception:
        import traceback

        traceback.print_exc()
        _status(
            "bnlab: this is a bug in bnlab, not a problem with your input; please report it with the traceback above."
        )
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]
