"""The question's per-epoch table (``epoch train/loss val/loss train/acc val/acc``).

The header and rows are the question's own format, so a run's output can be laid beside
the question's; anything bnlab adds (epoch i/N, seconds, ETA) goes in trailing columns.
"""

from __future__ import annotations

from collections.abc import Sequence

from bnlab.config import EpochRecord

TABLE_HEADER = "epoch  train/loss  val/loss  train/acc   val/acc"
SECONDS_HEADER = "   seconds"  # right-aligned over the rows' " {:>8.2f}s"


def table_header(*, seconds: bool = False) -> str:
    return TABLE_HEADER + (SECONDS_HEADER if seconds else "")


def format_row(rec: EpochRecord, *, seconds: bool = False) -> str:
    """One row of the question's table; seconds, when asked for, go in a trailing column."""
    row = f"{rec.epoch:>4d} {rec.train_loss:>10.4f} {rec.val_loss:>10.4f} {rec.train_acc:>10.4f} {rec.val_acc:>10.4f}"
    return f"{row} {rec.seconds:>8.2f}s" if seconds else row


def format_table(history: Sequence[EpochRecord], *, seconds: bool = False) -> str:
    return "\n".join([table_header(seconds=seconds), *(format_row(r, seconds=seconds) for r in history)])
