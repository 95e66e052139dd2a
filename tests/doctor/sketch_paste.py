"""Paste a shared-bn fix sketch into a model, as its comments say: the __init__ lines run
in the constructor, the forward lines become the forward, their ``...`` filled in."""

from __future__ import annotations


def sections(fix_code: str) -> tuple[list[str], list[str]]:
    """(the __init__ lines, the forward lines) of a per-site sketch, comments dropped."""
    lines = [line.split("  #")[0] for line in fix_code.splitlines()]
    split = next(i for i, line in enumerate(lines) if line.startswith("# forward"))
    return [line for line in lines[:split] if not line.startswith("#")], lines[split + 1 :]


def filled(line: str, act: str) -> str:
    """A forward line with its ``...`` filled in as in the tests' models, where every BN
    call reads ``x = act(bn(layer(x)))``: ``... bn(conv(...)) ...`` -> ``x =
    F.relu(bn(conv(x)))`` for ``act`` ``F.relu``."""
    indent = line[: len(line) - len(line.lstrip())]
    body = line.strip()
    if not (body.startswith("... ") and body.endswith(" ...")):
        return line
    return f"{indent}x = {act}({body[4:-4].replace('(...)', '(x)')})"


def forward_source(fix_code: str, name: str, act: str, head: str, tail: str) -> str:
    """Source of the method ``name(self, x)``: ``head``, the sketch's forward lines, ``tail``."""
    lines = [head, *(filled(line, act) for line in sections(fix_code)[1]), tail]
    return f"def {name}(self, x):\n" + "".join(f"    {line}\n" for line in lines)
