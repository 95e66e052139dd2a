"""dataparallel-bn: DataParallel with plain BN and few samples per device."""

from __future__ import annotations

from bnlab.doctor import thresholds
from bnlab.doctor.findings import Finding
from bnlab.doctor.registry import Context, register


@register("dataparallel-bn", "info", "DataParallel/DDP with plain BatchNorm and small per-device batches")
def check_parallel(ctx: Context) -> list[Finding]:
    info = ctx.probe.parallel
    if info is None or not info.plain_bn or info.per_device_batch >= thresholds.PER_DEVICE_BATCH_INFO:
        return []
    return [
        Finding(
            check="dataparallel-bn",
            severity="info",
            title=f"{info.wrapper} with plain BatchNorm and small per-device batches",
            where=", ".join(info.plain_bn),
            evidence=[
                f"{info.devices} device(s), about {info.per_device_batch} samples per device; "
                "each device normalizes over its own slice of the batch"
            ],
            data={"wrapper": info.wrapper, "devices": info.devices, "per_device_batch": info.per_device_batch},
            consequence=(
                "Batch statistics come from a few samples per device: noisy training and noisy running statistics."
            ),
            fix="Use SyncBatchNorm so statistics are computed over the whole batch.",
            fix_code=ctx.fixes.sync_bn(),
        )
    ]
