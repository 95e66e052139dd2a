"""The text and HTML pieces both reports are built from (``bnlab.report`` for a sweep,
``bnlab.grid_report`` for a grid): numbers, ``mean ± sd``, intervals, markdown and HTML
tables, embedded figures and the page's CSS. One place, so that the two reports look alike.
"""

from __future__ import annotations

import base64
import html
import math
import typing
from collections.abc import Sequence

if typing.TYPE_CHECKING:
    from bnlab.figures import SavedFigure
    from bnlab.seedstats import Stats


def num(x: float, digits: int = 4) -> str:
    """``x`` with ``digits`` decimals; ``-`` for a missing or non-finite number."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def mean_sd(s: Stats) -> str:
    """``mean ± sd``, or the mean alone for a single value."""
    return num(s.mean) if s.n < 2 else f"{num(s.mean)} ± {num(s.std)}"


def ci_text(s: Stats) -> str:
    """The confidence interval as ``[low, high]``; ``-`` for a single value."""
    return "-" if s.n < 2 else f"[{num(s.ci_low)}, {num(s.ci_high)}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; a ``|`` inside a cell is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


# .scroll: a table wider than the screen (420 px phones) scrolls inside its box instead of
# being cut off at the page's edge. Words wrap only between words, except in .long cells
# (paths, digests, platform strings), which may break anywhere.
CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:1em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}.long{overflow-wrap:anywhere}
@media (max-width:600px){body{margin:1em auto;padding:0 .5em}table{font-size:12px}td,th{padding:3px 4px}}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}.ok{color:#08660b;font-weight:600}
.bad{color:#a10d0d;font-weight:600}.small{color:#555;font-size:13px}code{background:#f5f5f5;padding:0 3px}"""


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]], long: Sequence[int] = ()) -> str:
    """A table in a box that scrolls sideways; the cells of the ``long`` columns may break anywhere."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)

    def cell(i: int, c: str) -> str:
        return f'<td class="long">{html.escape(str(c))}</td>' if i in long else f"<td>{html.escape(str(c))}</td>"

    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def figure_html(fig: SavedFigure) -> str:
    """The figure's PNG embedded (the HTML file stands alone), with its caption and file names."""
    data = base64.b64encode(fig.png_bytes).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(fig.title)}" src="data:image/png;base64,{data}">'
        f'<figcaption class="small">{html.escape(fig.caption)} Files: <code>{html.escape(fig.png.name)}</code>, '
        f"<code>{html.escape(fig.svg.name)}</code>.</figcaption></figure>"
    )
