"""The one JSON sanitizer in bnlab, used by the sweep reports, the CLI's ``--json`` and the
doctor's findings: any nest of dicts, lists and numbers as plain JSON data.

Pure Python (no numpy import): numpy and torch scalars are recognised by their ``item``
method, small arrays by ``tolist``.
"""

from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data: non-finite floats become ``None`` (JSON has no NaN),
    numpy / torch scalars Python numbers, tuples and arrays lists, dict keys strings, and
    anything else its ``str``."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        return json_safe(value.item())
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # small numpy arrays
        return json_safe(value.tolist())
    return str(value)
