"""Reading a PyTorch file without running code from it, and saying why it could not be read.

Every ``torch.load`` in bnlab goes through :func:`read_torch_file`: ``weights_only=True``
(tensors and plain containers only, never arbitrary unpickling), and one classification of the
failures, so a message never depends on the shape of torch's own text (empty for an empty
file, many paragraphs for a refused global):

- a pickle that needs a Python object to load (``os.system`` in a hostile file, a whole
  ``nn.Module`` in an honest one) is *refused, because loading it would run code*;
- an empty, truncated or foreign file is *not a PyTorch file*.

Framework-free at import: torch is imported when a file is read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from bnlab.errors import InputError, quote_error

# torch 2.4-2.14 word it "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module".
_GLOBAL = re.compile(r"unsupported\s+(?:global:\s+)?GLOBAL\s+([\w.]+)", re.IGNORECASE)


def unsafe_global(err: BaseException) -> str | None:
    """The Python object a refused pickle asked for (``posix.system``), or None."""
    found = _GLOBAL.search(str(err))
    return found.group(1) if found else None


def read_torch_file(path: str | os.PathLike, *, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure an InputError.

    ``fix`` is the sentence that tells the user how to write a file bnlab can read.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file. {fix}")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes): it was not written completely. {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds; each becomes one paragraph
        name = unsafe_global(err)
        if name is not None:
            raise InputError(
                f"{path} was refused: loading it would run code (its pickle asks for the Python "
                f"object {name}). bnlab reads PyTorch files with torch.load(weights_only=True), "
                "which only reads tensors and plain containers, because unpickling anything else "
                f"runs code from the file. {fix}"
            ) from None
        raise InputError(
            f"{path} is not a readable PyTorch file ({_reason(err)}): it is corrupt, truncated "
            f"or of another format. {fix}"
        ) from None


def _reason(err: BaseException) -> str:
    """What torch said, without the paragraph it puts before every weights-only refusal
    ("Weights only load failed. In PyTorch 2.6 we changed the default..."): the specific
    reason is the paragraph after it ("Unsupported operand 149")."""
    paragraphs = [p.strip() for p in str(err).split("\n\n") if p.strip()]
    if len(paragraphs) > 1 and paragraphs[0].startswith("Weights only load failed"):
        return f"{type(err).__name__}: {quote_error(RuntimeError(paragraphs[1]))[len('RuntimeError: ') :]}"
    return quote_error(err)
