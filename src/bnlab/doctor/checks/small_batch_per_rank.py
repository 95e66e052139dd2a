"""small-batch-per-rank: plain BatchNorm in a DDP job, each rank normalizing a tiny batch.

Every rank computes batch statistics over its own slice of the global batch (pytorch
issue 49794: accuracy changing with the number of GPUs). SyncBatchNorm computes them over
the whole global batch. The per-rank values per channel use the small-batch threshold.
"""

from __future__ import annotations

from bnlab.doctor import thresholds
from bnlab.doctor.checks.small_batch import too_small
from bnlab.doctor.findings import Finding
from bnlab.doctor.records import RanksInfo, SmallCall
from bnlab.doctor.registry import Context, register


@register(
    "small-batch-per-rank",
    "error",
    "DDP with plain BatchNorm (not SyncBatchNorm) and too few values per channel on each rank",
)
def check_small_batch_per_rank(ctx: Context) -> list[Finding]:
    info = ctx.probe.ranks
    if info is None:
        return []
    return [finding for path in info.plain_bn if (finding := _layer(info, path, ctx.fixes.sync_bn())) is not None]


def global_samples(info: RanksInfo) -> int | None:
    """Samples per step over all ranks (their largest training batches), None if unknown."""
    batches = [view.batch for view in info.views if view.batch > 0]
    if not batches:
        return None
    if len(info.views) < info.world_size:  # ranks that did not answer: assume batches alike
        return max(batches) * info.world_size
    return sum(batches)


def _layer(info: RanksInfo, path: str, fix_code: str) -> Finding | None:
    seen = {view.rank: view.smallest[path] for view in info.views if path in view.smallest}
    small = {rank: s for rank, s in seen.items() if too_small(s.samples, s.values)}
    if not small:
        return None
    worst: SmallCall = min(small.values(), key=lambda s: (s.values, s.samples))
    total = global_samples(info) or worst.samples * info.world_size
    values = worst.values * total // max(worst.samples, 1)  # values per sample is the layer's
    single = worst.values <= 1
    return Finding(
        check="small-batch-per-rank",
        severity="error" if single else "warning",
        title=(
            f"'{path}' is plain BatchNorm normalizing {worst.values} value(s) per channel on each rank; "
            f"SyncBatchNorm would normalize over the global batch of {total}"
        ),
        where=path,
        sites=[worst.site],
        evidence=[
            "; ".join(
                f"rank {rank}: batch of {s.samples} -> {s.values} value(s) per channel" for rank, s in small.items()
            )
            + f" (warning below {thresholds.SMALL_BATCH_WARN})",
            f"{info.world_size} ranks: SyncBatchNorm would see {total} samples ({values} values per channel) per step",
        ],
        data={
            "per_rank": {
                str(rank): {"batch_size": s.samples, "values_per_channel": s.values} for rank, s in small.items()
            },
            "world_size": info.world_size,
            "global_batch": total,
            "global_values_per_channel": values,
        },
        consequence=(
            "Each rank normalizes with statistics of its own few samples: noisy training, noisy running "
            "statistics, and results that change with the number of processes."
        ),
        fix="Convert the BN layers to SyncBatchNorm before wrapping the model in DDP.",
        fix_code=fix_code,
    )
