"""``BNDoctorCallback``: the doctor's ``watch`` inside Keras 3's ``model.fit``.

    from bnlab.doctor.keras import BNDoctorCallback

    model.fit(x, y, epochs=3, callbacks=[BNDoctorCallback(fail_on="error")])

The callback only observes: it enters :func:`bnlab.doctor.watch` on the model when
training begins and leaves it when training ends, so the wrappers are gone and the
model's weights, training and history are those of the same fit without it. What it
counts per step is described in :mod:`bnlab.doctor.backends.keras.watch` (compiled steps on
TensorFlow and JAX included); the optimizer given to ``compile`` is checked for weight
decay on the BatchNormalization parameters. At the end of fit the model is probed on a
copy with a training batch, the report is printed, kept as ``callback.report``, and,
with ``fail_on``, turned into an exception.

Keras has no hook for a fit that raises: the wrappers of such a fit stay (they only
count) until this callback's next ``fit`` begins, which removes them first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from bnlab.doctor.fail_on import checked, raise_if_failed
from bnlab.doctor.findings import Report
from bnlab.doctor.watch import Watch, watch


class BNDoctorCallback(keras.callbacks.Callback):
    """Watch BatchNormalization layers during ``fit`` and report what the doctor finds.

    - ``fail_on``: ``"error"`` or ``"warning"`` raises :class:`bnlab.doctor.keras.BNDoctorFailed`
      at the end of fit when the report has such findings; ``None`` (default) only reports.
    - ``echo``: where the text report goes (default ``print``; ``None`` for silence).
    """

    def __init__(self, *, fail_on: str | None = None, echo: Callable[[str], Any] | None = print) -> None:
        super().__init__()
        self.fail_on = checked(fail_on)
        self.echo = echo
        self.report: Report | None = None
        self._watch: Watch | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._close()  # a previous fit that raised left its wrappers
        self.report = None
        self._watch = watch(self.model, optimizer=getattr(self.model, "optimizer", None))
        self._watch.__enter__()

    def on_train_end(self, logs: dict | None = None) -> None:
        current = self._close()
        if current is None:
            return
        self.report = current.report()
        if self.echo is not None:
            self.echo(self.report.to_text())
        raise_if_failed(self.report, self.fail_on)

    def _close(self) -> Watch | None:
        current, self._watch = self._watch, None
        if current is not None:
            current.__exit__(None, None, None)  # removes every wrapper, then builds the report
        return current
