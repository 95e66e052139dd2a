"""``bnlab.doctor.repair``: cure a trained model's batch norm without retraining.

>>> fixed = bnlab.doctor.repair(model, train_batches)        # a NEW model
>>> result = repair_report(model, train_batches, held_out)   # ... with before/after numbers

Two steps, on a deep copy (the model given is never changed):

1. each stateful BN called more than once per forward pass becomes one BN per call site
   (affine parameters copied); bnlab's own shared-BN MLP becomes the per-layer MLP;
2. every BN's running statistics are re-estimated as the cumulative average over the
   given batches in train mode (``torch.optim.swa_utils.update_bn`` where it fits;
   Chainer: ``avg_mean`` / ``avg_var``; Keras: the moving statistics, through Keras's own
   update). This also cures statistics that were reset or left stale.

Keras: functional and Sequential models (a subclassed one is refused with a message); the
split clones the graph with one BatchNormalization per call site.

The weights are not touched: no gradient step is taken.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bnlab.doctor.backend import Backend
from bnlab.doctor.backends import chosen, detect


def check_repairable(model: Any, backend: Backend) -> None:
    """A UsageError now, before any work, for a model the repair cannot take (Keras:
    a subclassed model); nothing for the others."""
    backend.check_repairable(model)


def _batches(batches: Iterable[Any]) -> list[tuple[Any, Any]]:
    """``(inputs, labels)`` pairs, or bare inputs (labels are not needed to re-estimate)."""
    out: list[tuple[Any, Any]] = []
    for item in batches:
        out.append((item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None))
    return out


@dataclass
class RepairResult:
    """A repaired model, what changed where, and eval-mode numbers before and after."""

    model: Any
    framework: str
    changes: list[dict[str, Any]]
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    evaluated_on: str = ""
    notes: list[str] = field(default_factory=list)  # what the caller knows about the weights repaired

    @property
    def splits(self) -> dict[str, int]:
        """Module path -> call sites, for every BN that was split."""
        return {c["where"]: c["calls"] for c in self.changes if c["change"] == "split"}

    def to_dict(self) -> dict[str, Any]:
        from bnlab.doctor.findings import clean

        return clean(
            {
                "framework": self.framework,
                "changes": self.changes,
                "before": self.before,
                "after": self.after,
                "evaluated_on": self.evaluated_on,
                "notes": self.notes,
            }
        )

    def to_text(self) -> str:
        return render_text(self)


def repair(
    model: Any,
    batches: Iterable[Any],
    *,
    split: Iterable[str] | None = None,
    framework: str | Backend = "auto",
) -> Any:
    """A NEW model: shared BNs split per call site, running statistics re-estimated.

    ``batches``: training inputs, ``(inputs, labels)`` pairs or bare inputs; one pass
    over them is the re-estimation (a DataLoader over the training set works).
    ``split``: paths of the BNs to split; default every stateful BN called more than
    once per forward pass.
    """
    return repair_report(model, batches, None, split=split, framework=framework).model


def repair_report(
    model: Any,
    batches: Iterable[Any],
    held_out: Iterable[Any] | None,
    *,
    split: Iterable[str] | None = None,
    framework: str | Backend = "auto",
    evaluated_on: str = "",
) -> RepairResult:
    """:func:`repair`, plus eval-mode accuracy, loss and train/eval agreement before and
    after on the labelled ``held_out`` batches (when given).

    ``framework``: "auto" (detected), a backend name, or the ``Backend`` already detected."""
    backend = chosen(model, framework)
    new, changes = backend.repair(model, _batches(batches), split=split)
    result = RepairResult(new, backend.NAME, changes, evaluated_on=evaluated_on)
    if held_out is not None:
        held = _batches(held_out)
        result.before = backend.evaluate(model, held)
        result.after = backend.evaluate(new, held)
    return result


def split_shared(model: Any, calls: dict[str, int], *, framework: str = "auto") -> Any:
    """A copy of ``model`` with the repaired architecture (``calls``: path -> call sites,
    as in ``RepairResult.splits``), to load the repaired weights into."""
    return detect(model, framework).split_shared(model, calls)


# -- text ---------------------------------------------------------------------------------


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _change_line(change: dict[str, Any]) -> str:
    if change["change"] == "split":
        return (
            f"split {change['where']} (called {change['calls']} times: "
            f"{'; '.join(change['sites'])}) into {', '.join(change['into'])} "
            f"({change['layout']}); affine parameters copied"
        )
    if change["change"] == "kept":
        return f"kept {change['where']}: {change['why']}"
    moved = change["old_vs_new"]
    source = f" (from {change['from']})" if change["from"] != change["where"] else ""
    return (
        f"re-estimated {change['where']}{source} over {change['batches']} batches: the old "
        f"statistics were {moved['mean_shift']:.2f} SD (mean) and a variance ratio of "
        f"{moved['var_ratio']:.2f} from the new"
    )


def render_text(result: RepairResult, width: int = 88) -> str:
    lines = ["repair: a new model (the one given is unchanged); no weight was trained"]
    for note in result.notes:  # first: they say what the numbers below are worth
        lines += textwrap.wrap(note, width=width, initial_indent="  note: ", subsequent_indent="    ")
    methods = sorted({c["method"] for c in result.changes if c["change"] == "re-estimated"})
    for change in result.changes:
        lines += textwrap.wrap(_change_line(change), width=width, initial_indent="  - ", subsequent_indent="    ")
    if methods:
        lines += textwrap.wrap(
            f"running statistics: cumulative average in train mode ({'; '.join(methods)})",
            width=width,
            initial_indent="  ",
            subsequent_indent="    ",
        )
    if result.before or result.after:
        lines.append(f"  {'':<30}{'before':>8}  {'after':>8}")
        for key, label in (
            ("val_acc", "val acc (eval mode)"),
            ("val_loss", "val loss (eval mode)"),
            ("train_eval_agreement", "train/eval agreement"),
        ):
            lines.append(f"  {label:<30}{_number(result.before.get(key)):>8}  {_number(result.after.get(key)):>8}")
        if result.evaluated_on:
            lines.append(f"  evaluated on {result.evaluated_on}")
    return "\n".join(lines) + "\n"
