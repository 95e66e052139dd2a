"""Grids: ``--grid FIELD=V1,V2,...`` axes over any field ``--set`` accepts, their points,
and the readable, file-name-safe name of each point.

A grid is a list of axes; its points are the product of the axes' values, in the order
given (the first axis varies slowest). A point is a tuple of (dotted field name, typed
value) pairs. Values are parsed and validated by ``bnlab.config`` exactly as ``--set``
parses them, so a grid accepts every field and every spelling ``--set`` does. No torch here.
"""

from __future__ import annotations

import itertools
import math
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnlab.config import MODEL_FIELDS, TRAIN_FIELDS, parse_value, resolve_field
from bnlab.errors import UsageError
from bnlab.rundir import SAFE_NAME

GridPoint = tuple[tuple[str, Any], ...]

# Fields a grid may not vary: the seed has --seeds, and the rest only say where a run runs.
NOT_GRIDDABLE = ("train.seed", "train.device", "train.threads", "train.trace_bn_channels")
# Between two axes in a point's directory name: "bn_momentum-0.01__batch_size-100".
PART_SEPARATOR = "__"
MAX_POINTS = 10_000


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid`` axis: a config field and the values it takes, parsed to its type."""

    field: str  # dotted: "model.bn_momentum"
    values: tuple[Any, ...]

    @property
    def name(self) -> str:
        """The short name (``bn_momentum``): what tables, plots and directories show."""
        return self.field.rpartition(".")[2]

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)

    @property
    def spans_decades(self) -> bool:
        """Whether a log scale shows these values better: all positive, max/min >= 10."""
        if not self.numeric or any(v <= 0 for v in self.values):
            return False
        return max(self.values) / min(self.values) >= 10


def _field_type(section: str, name: str) -> Any:
    return (MODEL_FIELDS if section == "model" else TRAIN_FIELDS)[name]


def parse_axis(text: str) -> GridAxis:
    """``"model.bn_momentum=0.01,0.1,0.5"`` -> GridAxis. Values are separated by commas;
    a field that itself holds a comma-separated list (``widths``) separates its values
    with ``;`` (``widths=784,100,100,10;784,256,256,10``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--grid {text!r}: write FIELD=V1,V2,... e.g. --grid bn_momentum=0.01,0.1,0.5.")
    section, name, typ = resolve_field(key)
    dotted = f"{section}.{name}"
    if dotted in NOT_GRIDDABLE:
        hint = "use --seeds for seeds" if name == "seed" else "it says where a run runs, not what it is"
        raise UsageError(f"--grid cannot vary {dotted}: {hint}.")
    is_list = typing.get_origin(typ) is tuple
    items = [v.strip() for v in raw.split(";" if is_list else ",")]
    if not raw.strip() or any(not v for v in items):
        example = "784,100,100,10;784,256,256,10" if is_list else "0.01,0.1,0.5"
        raise UsageError(f"--grid {text!r} has an empty value; write e.g. --grid {name}={example}.")
    try:
        values = tuple(parse_value(v, typ) for v in items)
    except ValueError as err:
        raise UsageError(f"--grid {text!r}: bad value for {dotted}: {err}.") from None
    if len(set(values)) != len(values):
        raise UsageError(f"--grid {text!r} lists a value twice; list each value once.")
    return GridAxis(dotted, values)


def check_axes(axes: Sequence[GridAxis], overrides: dict[str, Any]) -> None:
    """Refuse a field given twice: on two axes, or on an axis and in --set / a flag."""
    fields = [a.field for a in axes]
    twice = sorted({f for f in fields if fields.count(f) > 1})
    if twice:
        raise UsageError(
            f"--grid names {', '.join(twice)} more than once; give each field one --grid with all its values."
        )
    set_fields = {".".join(resolve_field(k)[:2]) for k in overrides}
    both = sorted(set(fields) & set_fields)
    if both:
        raise UsageError(f"{', '.join(both)} is set by a flag or --set and also varied by --grid; drop one of them.")
    count = math.prod(len(a.values) for a in axes)
    if count > MAX_POINTS:
        raise UsageError(f"the grid has {count} points (more than {MAX_POINTS}); split it into smaller sweeps.")


def grid_points(axes: Sequence[GridAxis]) -> list[GridPoint]:
    """Every point of the grid, first axis slowest; [()] for no axes (one point)."""
    fields = [a.field for a in axes]
    return [tuple(zip(fields, values, strict=True)) for values in itertools.product(*(a.values for a in axes))]


def format_value(value: Any) -> str:
    """How a point shows a value: 0.01, 100, 784x100x100x10, per-layer."""
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def point_name(point: GridPoint) -> str:
    """The directory name of a point: ``bn_momentum-0.01__batch_size-100`` (letters, digits
    and ``-_.`` only, so ``bnlab.rundir.safe_name`` accepts it); ``""`` for no axes."""
    parts = [f"{field.rpartition('.')[2]}-{_UNSAFE.sub('_', format_value(value))}" for field, value in point]
    name = PART_SEPARATOR.join(parts)
    if name and not SAFE_NAME.match(name):
        # Too long for one path component (over 100 characters): a short, stable stand-in.
        import hashlib

        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{name[:80].rstrip('_.-')}-{digest}"
    return name


def point_label(point: GridPoint) -> str:
    """How text shows a point: ``bn_momentum=0.01 batch_size=100``."""
    return " ".join(f"{field.rpartition('.')[2]}={format_value(value)}" for field, value in point)


def point_overrides(point: GridPoint) -> dict[str, Any]:
    """The point as overrides for ``bnlab.config.apply_overrides`` (already typed)."""
    return dict(point)
