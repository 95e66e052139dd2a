"""TensorFlow's C++ start-up logging (oneDNN, CPU features, absl INFO lines on stderr),
quieted the one way bnlab does it: for the tensorflow engine and for the doctor's Keras
backend."""

from __future__ import annotations

import os
import sys


def quiet_tensorflow_logging() -> None:
    """``TF_CPP_MIN_LOG_LEVEL=2`` (errors only), unless the user set it. TensorFlow reads it
    once, as it is imported: after that this changes nothing, so it is left alone."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
