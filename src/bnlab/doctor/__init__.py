"""``bnlab doctor``: find batch-normalization mistakes in a user's own model.

>>> report = bnlab.doctor.check(model, x, labels=y, train_steps=60)
>>> print(report)            # text; report.to_json() for machines
>>> report.exit_code         # 1 when any finding is an error

or, around your own training loop::

    with bnlab.doctor.watch(model) as w:
        ...  # train as usual
    print(w.report())

and, to cure a shared or stale BN without retraining (a NEW model; see
:mod:`bnlab.doctor.repair`)::

    fixed = bnlab.doctor.repair(model, train_batches)

The model is never modified: probes and training steps run on a deep copy, and all
hooks are removed afterwards.
"""

from bnlab.doctor.api import check
from bnlab.doctor.findings import Finding, Report
from bnlab.doctor.repair import repair
from bnlab.doctor.watch import watch

__all__ = ["Finding", "Report", "check", "repair", "watch"]
