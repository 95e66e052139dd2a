"""rank-divergent-stats: the ranks of a DDP job each keep running statistics of their own.

Compared as the last synchronising training pass began on each rank (after DDP's buffer
broadcast, when it broadcasts): a healthy job holds the same statistics on every rank
there. With ``broadcast_buffers=False`` and plain BatchNorm each rank's statistics follow
its own share of the data, and a checkpoint saved on rank 0 keeps rank 0's alone.
"""

from __future__ import annotations

import numpy as np

from bnlab.doctor import thresholds
from bnlab.doctor.findings import Finding
from bnlab.doctor.records import RanksInfo
from bnlab.doctor.registry import Context, register


@register(
    "rank-divergent-stats",
    "warning",
    "DDP ranks holding different running statistics (broadcast_buffers=False...); a rank-0 checkpoint keeps rank 0's",
)
def check_rank_divergent_stats(ctx: Context) -> list[Finding]:
    info = ctx.probe.ranks
    if info is None or len(info.views) < 2:
        return []
    paths = dict.fromkeys(path for view in info.views for path in view.synced_stats)
    return [finding for path in paths if (finding := _layer(info, path)) is not None]


def _layer(info: RanksInfo, path: str) -> Finding | None:
    views = [view for view in info.views if path in view.synced_stats]
    if len(views) < 2:
        return None
    means = np.stack([view.synced_stats[path][0] for view in views])
    variances = np.stack([view.synced_stats[path][1] for view in views])
    mean_diff, var_diff = np.ptp(means, axis=0), np.ptp(variances, axis=0)
    scale = max(1.0, float(np.max(np.abs(means))), float(np.max(np.abs(variances))))
    if max(float(mean_diff.max()), float(var_diff.max())) <= thresholds.RANK_STATS_REL_TOL * scale:
        return None
    per_rank = [
        {"rank": view.rank, "running_mean_avg": pair[0], "running_var_avg": pair[1]}
        for view in views
        if (pair := view.final_stats.get(path)) is not None
    ]
    return Finding(
        check="rank-divergent-stats",
        severity="warning",
        title=f"'{path}' has different running statistics on each of the {len(views)} ranks",
        where=path,
        evidence=[
            f"as the last synchronising training step began: running_mean differs across ranks by up to "
            f"{float(mean_diff.max()):.4g} (channel {int(mean_diff.argmax())}), running_var by up to "
            f"{float(var_diff.max()):.4g} (channel {int(var_diff.argmax())})",
            "at the end, channel averages of running_mean / running_var: "
            + "; ".join(
                f"rank {r['rank']}: {r['running_mean_avg']:.4g} / {r['running_var_avg']:.4g}" for r in per_rank
            ),
        ],
        data={
            "ranks": [view.rank for view in views],
            "running_mean_max_abs_diff": float(mean_diff.max()),
            "running_var_max_abs_diff": float(var_diff.max()),
            "per_rank": per_rank,
        },
        consequence=(
            f"Each rank evaluates with statistics of its own 1/{info.world_size} of the data, so the ranks "
            "disagree in eval mode; a checkpoint saved from rank 0 keeps rank 0's statistics only."
        ),
        fix=(
            "Keep DDP's buffer broadcast on (broadcast_buffers=True, forward_sync_buffers from "
            "torch 2.13; the default: every forward starts from rank 0's statistics), or convert the BN layers to SyncBatchNorm (statistics of the global "
            "batch on every rank), or average the running statistics over the ranks before saving."
        ),
        fix_code="model = DDP(model)  # buffers broadcast from rank 0 at every forward (the default)",
    )
