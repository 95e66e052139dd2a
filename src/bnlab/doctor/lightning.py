"""The PyTorch Lightning callback of the doctor (it lives with the PyTorch backend:
:mod:`bnlab.doctor.backends.torch.lightning`)::

    from bnlab.doctor.lightning import BNDoctorCallback
"""

from bnlab.doctor.backends.torch.lightning import BNDoctorCallback, BNDoctorFailed

__all__ = ["BNDoctorCallback", "BNDoctorFailed"]
