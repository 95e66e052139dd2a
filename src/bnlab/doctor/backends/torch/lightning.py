"""``BNDoctorCallback``: the doctor's ``watch`` inside a PyTorch Lightning ``Trainer.fit``.

    from bnlab.doctor.lightning import BNDoctorCallback

    trainer = lightning.Trainer(callbacks=[BNDoctorCallback(fail_on="error")])
    trainer.fit(model, train_loader)

The callback only observes: it enters :func:`bnlab.doctor.watch` on the LightningModule
when fit starts and leaves it when fit ends (or fails), so the hooks are gone in every
case; the model, its training and its outputs are unchanged. The report is printed on
the global-zero process, kept as ``callback.report`` (and every report in
``callback.reports``), and, with ``fail_on``, turned into an exception once fit is over.
``every_n_epochs=N`` also reports every N training epochs (each report covers the
epochs since the previous one; the probe runs on a copy of the model).

Under the DDP strategy the callback watches the DistributedDataParallel model Lightning
wraps around the LightningModule (``trainer.strategy.model``), as ``watch(ddp_model)`` in
a plain loop: at the end of fit the ranks compare their BN statistics and batches
(:mod:`bnlab.doctor.backends.torch.distributed`), then gather one flag each, whether
their report fails ``fail_on``, so that all ranks raise or none does: a rank left alone
would wait for the others at the job's next collective.

Install with ``pip install "bnlab[lightning]"``; Lightning is imported only here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as err:
    raise ImportError("bnlab.doctor.lightning needs PyTorch Lightning: pip install 'bnlab[lightning]'") from err

from torch.nn.parallel import DistributedDataParallel

from bnlab.doctor.backends.torch import distributed as torch_distributed
from bnlab.doctor.fail_on import BNDoctorFailed, checked, fails
from bnlab.doctor.findings import Report
from bnlab.doctor.watch import Watch

__all__ = ["BNDoctorCallback", "BNDoctorFailed"]

_NOT_COMPARED = (
    "the ranks of this DDP job were not compared: with module=, each rank watches that "
    "submodule alone; leave module out (training_step calling self(x)) to compare them"
)


class BNDoctorCallback(Callback):
    """Watch BN layers during ``fit`` and report what the doctor finds.

    - ``fail_on``: ``"error"`` or ``"warning"`` raises :class:`BNDoctorFailed` at the end of
      fit when the final report has such findings; ``None`` (default) only reports.
    - ``every_n_epochs``: also report every N training epochs (``None``: at the end only).
    - ``module``: name of the LightningModule's attribute to watch (e.g. ``"net"``) when
      ``training_step`` calls that submodule instead of ``self(x)``; default: the
      LightningModule itself.
    - ``echo``: where the text report goes (default ``print``; ``None`` for silence).
    """

    def __init__(
        self,
        *,
        fail_on: str | None = None,
        every_n_epochs: int | None = None,
        module: str | None = None,
        echo: Callable[[str], Any] | None = print,
    ) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be 1 or more, not {every_n_epochs!r}")
        self.fail_on = checked(fail_on)
        self.every_n_epochs = every_n_epochs
        self.module = module
        self.echo = echo
        self.reports: list[Report] = []
        self._watch: Watch | None = None
        self._note = ""

    @property
    def report(self) -> Report | None:
        """The latest report (the one of the whole fit once it has ended)."""
        return self.reports[-1] if self.reports else None

    # -- the watch's life: entered at fit start, always left -----------------------------
    def _target(self, pl_module: Any) -> Any:
        if self.module is None:
            return pl_module
        target = getattr(pl_module, self.module, None)
        if target is None:
            raise ValueError(
                f"BNDoctorCallback(module={self.module!r}): {type(pl_module).__name__} has no "
                "such attribute; name the submodule that training_step calls."
            )
        return target

    def _watched(self, trainer: Any, pl_module: Any) -> tuple[Any, str]:
        """What to watch, and a note for the report: the DDP model of a multi-process
        strategy, whose ranks ``watch`` compares, when it wraps the LightningModule itself
        (Lightning >= 2.1: the report then names layers by the LightningModule's own paths);
        else the LightningModule (or its ``module`` attribute), on each rank alone."""
        wrapped = getattr(trainer.strategy, "model", None)
        if not isinstance(wrapped, DistributedDataParallel) or trainer.world_size < 2:
            return self._target(pl_module), ""  # one process (DDP of one rank included): nothing to compare
        if self.module is None and wrapped.module is pl_module:
            return wrapped, ""
        return self._target(pl_module), _NOT_COMPARED

    def _open(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        # One optimizer: hand it over (weight decay on BN parameters is then checked);
        # with several, the watch finds the one it sees stepping the model.
        optimizer = optimizers[0] if len(optimizers) == 1 else None
        model, self._note = self._watched(trainer, pl_module)
        self._watch = Watch(model, optimizer=optimizer, echo=None)  # the report is echoed in _close
        self._watch.__enter__()

    def _close(self, trainer: Any, *, failed: bool = False) -> Report | None:
        current, self._watch = self._watch, None
        if current is None:
            return None
        current.__exit__(None, None, None)  # removes every hook, then (DDP) compares the ranks, builds the report
        if failed:
            return None  # the user's exception matters; a half-run report would mislead
        report = current.report()
        report.notes += [self._note] if self._note else []
        self.reports.append(report)
        if self.echo is not None and getattr(trainer, "is_global_zero", True):
            self.echo(report.to_text())
        return report

    def _finish(self, trainer: Any, *, failed: bool = False) -> None:
        """Close the fit's watch; raise BNDoctorFailed where ``fail_on`` says, on every rank alike."""
        current = self._watch
        report = self._close(trainer, failed=failed)
        stop = not failed and fails(report, self.fail_on)
        # DDP: every rank that closed its watch gathers the flags, the failed one included
        info = current.ranks if current is not None else None
        flagged = torch_distributed.flagged_ranks(info, stop) if info is not None else None
        if failed or report is None or not (stop or flagged):
            return
        raise BNDoctorFailed(report, other_ranks=None if stop else flagged)

    # -- Lightning hooks ------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.reports = []
        self._open(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs is None or epoch % self.every_n_epochs:
            return
        if epoch >= (trainer.max_epochs or 0) > 0:
            return  # the last epoch is reported by on_fit_end
        self._close(trainer)
        self._open(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(trainer, failed=True)
