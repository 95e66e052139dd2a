"""One rank of a real 2-process Lightning DDP job for tests/doctor/test_doctor_lightning.py
(and the model the one-process Lightning tests fit).

    python lightning_ddp_worker.py fits RANK PORT OUT_DIR

The test starts both ranks with the variables a launcher such as torchrun sets, so
Lightning's DDP strategy joins them (gloo, 127.0.0.1:PORT) instead of starting processes of
its own. Each rank fits the question's MLP (one BN per hidden layer) three times from the
same seed, on its shard of real MNIST (Lightning's distributed sampler):

- plain: healthy DDP, no callback, SGD with weight decay (on the BN parameters too);
- watched: the same with ``BNDoctorCallback`` (its weights must equal plain's; the weight
  decay must be reported on bn1 and bn2, the LightningModule's names);
- no-broadcast: ``DDPStrategy(broadcast_buffers=False)``: the ranks' BN statistics drift
  apart; ``fail_on="error"`` on rank 0, ``"warning"`` on rank 1, so only rank 1's own
  report fails, and both ranks must raise;
- submodule: ``BNDoctorCallback(module="net")`` on a LightningModule whose training_step
  calls ``self.net``: each rank watches it alone, and the report says the ranks were not
  compared.

It writes ``OUT_DIR/rank<RANK>.json``: the reports, what each fit raised, whether the
weights matched.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision_compat import import_torchvision

try:  # lightning imports torchmetrics, which imports torchvision when installed (DEVELOPERS.md)
    import_torchvision()
except ImportError:
    pass
import lightning  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from watch_training_loop import MLP  # noqa: E402

from bnlab.data import load_mnist, to_float  # noqa: E402
from bnlab.doctor.lightning import BNDoctorCallback, BNDoctorFailed  # noqa: E402

SAMPLES = 2000  # 1000 per rank: 10 steps of 100


class MNISTClassifier(lightning.LightningModule):
    """The question's MLP (784-100-100-10, examples/watch_training_loop.py): one BN per
    layer, or one BN after both layers."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self._modules.update(MLP(shared)._modules)  # its layers, under its names (bn2 may be bn1)

    forward = MLP.forward

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Decayed(MNISTClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, weight_decay=5e-4)


class Nested(lightning.LightningModule):
    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.net = MLP(shared)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def loader() -> DataLoader:
    data = load_mnist()
    x = torch.as_tensor(to_float(data.train_images[:SAMPLES]))
    y = torch.as_tensor(data.train_labels[:SAMPLES].astype("int64"))
    return DataLoader(TensorDataset(x, y), batch_size=100)  # Lightning adds the distributed sampler


def trainer(callbacks: list, devices: int = 2, strategy: Any = "auto", epochs: int = 1) -> lightning.Trainer:
    """A CPU trainer with nothing but ``callbacks`` (no logger, checkpoints, progress bar)."""
    return lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def fit(strategy: Any, callback: BNDoctorCallback | None, kind: type = MNISTClassifier) -> tuple[nn.Module, str]:
    """The model after one epoch, and what fit raised ("" if nothing)."""
    torch.manual_seed(0)
    model = kind(shared=False)
    try:
        trainer([callback] if callback is not None else [], strategy=strategy).fit(model, loader())
    except BNDoctorFailed as err:
        return model, str(err)
    return model, ""


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def main() -> None:
    rank, port, out = int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    # what torchrun would set: Lightning then joins this process to the job
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    plain, _ = fit("ddp", None, Decayed)
    watched_cb = BNDoctorCallback()
    watched, _ = fit("ddp", watched_cb, Decayed)
    apart_cb = BNDoctorCallback(fail_on="error" if rank == 0 else "warning")
    _, raised = fit(DDPStrategy(broadcast_buffers=False), apart_cb)
    nested_cb = BNDoctorCallback(module="net", echo=None)
    fit("ddp", nested_cb, Nested)
    result = {
        "rank": rank,
        "same_weights": same_weights(plain, watched),
        "watched": watched_cb.report.to_dict(),
        "apart": apart_cb.report.to_dict(),
        "apart_raised": raised,
        "nested": nested_cb.report.to_dict(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
