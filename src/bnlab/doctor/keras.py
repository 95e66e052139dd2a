"""The doctor inside Keras 3's ``model.fit``: ``callbacks=[BNDoctorCallback()]``.

Keras is imported here (a Keras user has it); see :mod:`bnlab.doctor.keras_callback`.
"""

from __future__ import annotations

from bnlab.doctor.fail_on import BNDoctorFailed
from bnlab.doctor.keras_callback import BNDoctorCallback

__all__ = ["BNDoctorCallback", "BNDoctorFailed"]
