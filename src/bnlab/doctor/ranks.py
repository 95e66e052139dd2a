"""The ranks of a multi-process job as ``watch`` compares them (framework-free).

Each rank's :class:`~bnlab.doctor.records.RankView` travels to the others as JSON bytes
(never a pickle: nothing received from a socket is unpickled); the framework's side
(:mod:`bnlab.doctor.backends.torch.distributed`) moves the bytes. :func:`notes` says in the report
what kept the comparison partial: a rank that failed, hung or died, uneven step counts.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from bnlab.doctor.records import RanksInfo, RankView, SmallCall


def encode(view: RankView) -> bytes:
    data: dict[str, Any] = {
        "rank": view.rank,
        "steps": view.steps,
        "passes": view.passes,
        "batch": view.batch,
        "synced_stats": {path: [m.tolist(), v.tolist()] for path, (m, v) in view.synced_stats.items()},
        "final_stats": {path: list(pair) for path, pair in view.final_stats.items()},
        "smallest": {path: [s.samples, s.values, s.site, s.passes] for path, s in view.smallest.items()},
        "raised": view.raised,
    }
    return json.dumps(data).encode()


def decode(payload: bytes) -> RankView:
    data = json.loads(payload.decode())
    return RankView(
        rank=int(data["rank"]),
        steps=int(data["steps"]),
        passes=int(data["passes"]),
        batch=int(data["batch"]),
        synced_stats={
            path: (np.asarray(m, dtype=np.float64), np.asarray(v, dtype=np.float64))
            for path, (m, v) in data["synced_stats"].items()
        },
        final_stats={path: (float(m), float(v)) for path, (m, v) in data["final_stats"].items()},
        smallest={
            path: SmallCall(int(n), int(values), str(site), passes=int(passes))
            for path, (n, values, site, passes) in data["smallest"].items()
        },
        raised=str(data["raised"]),
    )


def notes(info: RanksInfo) -> list[str]:
    """Lines for the report: how many ranks were compared, and what kept it partial."""
    if info.problem:
        return [info.problem]
    lines = [f"compared the {len(info.views)} ranks of this job at the end of the `with watch` block"]
    for view in info.views:
        if view.raised:
            lines.append(
                f"rank {view.rank} left its `with watch` block with an exception ({view.raised}); "
                "its statistics are compared as they were then"
            )
    steps = {view.rank: view.steps for view in info.views}
    if len(set(steps.values())) > 1:
        counts = ", ".join(f"rank {rank}: {n}" for rank, n in steps.items())
        lines.append(
            f"the ranks saw different numbers of training steps ({counts}): uneven inputs "
            "(DDP's join()) or a rank that stopped early"
        )
    return lines
