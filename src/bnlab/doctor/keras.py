"""The doctor inside Keras 3's ``model.fit`` (it lives with the Keras backend:
:mod:`bnlab.doctor.backends.keras.callback`)::

    from bnlab.doctor.keras import BNDoctorCallback

    model.fit(x, y, callbacks=[BNDoctorCallback(fail_on="error")])
"""

from bnlab.doctor.backends.keras.callback import BNDoctorCallback
from bnlab.doctor.fail_on import BNDoctorFailed

__all__ = ["BNDoctorCallback", "BNDoctorFailed"]
