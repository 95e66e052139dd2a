"""Import torchvision (and timm) beside the CPU build of torch, for the real-model zoo.

Why this exists. The package index's torchvision 0.28.0 (the release for torch 2.13) is
built against the CUDA build of torch: its C extension ``_C.so`` links ``libtorch_cuda.so``
and ``libc10_cuda.so``, which the CPU build ``torch==2.13.0+cpu`` does not ship. torchvision
copes with a missing extension (every op checks ``_has_ops()`` first) except in one place:
``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, and registering a kernel for an operator whose schema
was never defined raises ``RuntimeError: operator torchvision::nms does not exist`` -- so
``import torchvision`` (and ``import timm``, which imports it) fails.

What this does. Only when that exact error happens: forget the half-imported torchvision
modules, define the two schemas (as the C extension would have), and import again. Nothing
else changes: the schemas get no CPU kernel, so calling ``torchvision.ops.nms`` still fails
loudly ("Couldn't load custom C++ ops"), as it does in any install whose extension did not load.

Why it is safe for these tests. They only *build* classification models (resnet, mobilenet,
efficientnet, ...) from plain ``torch.nn`` layers, without pretrained weights, and run their
forward passes; none of those uses a torchvision C++ op (NMS, RoI align, deformable conv are
detection ops). A correct install -- a CUDA torch with its torchvision, or a CPU torchvision
from download.pytorch.org -- imports at the first attempt and this module does nothing.

This is test support only: bnlab's library code never imports torchvision.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

# The schemas torchvision's C extension defines for the two ops registered unconditionally.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = "operator torchvision::"
_library: torch.library.Library | None = None  # kept alive: dropping it undefines the schemas
shimmed = False  # True once the schemas had to be defined here (the report says so)


def _forget_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _define_schemas() -> None:
    global _library, shimmed
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS.values():
            _library.define(schema)
    shimmed = True


def import_torchvision() -> ModuleType:
    """``import torchvision``, defining the two missing schemas only if the import needs them.

    Raises ImportError when torchvision is not installed (``pytest.importorskip`` style
    callers skip on it) and re-raises any other failure unchanged.
    """
    try:
        import torchvision
    except RuntimeError as err:
        if _MISSING_OP not in str(err) or shimmed:
            raise
        _forget_torchvision()
        _define_schemas()
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    """``import timm`` (which imports torchvision), through :func:`import_torchvision`."""
    import_torchvision()
    import timm

    return timm
