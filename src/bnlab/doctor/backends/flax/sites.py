"""One BatchNorm per call site for a flax.linen model, without touching the user's module.

A linen module is a frozen dataclass whose layers are declared in the user's ``setup`` or
``@nn.compact`` code: the doctor cannot give it a second BatchNorm. :class:`SiteSplit`
wraps it instead: the user's module runs as the child ``inner``, and every call of a shared
BatchNorm (path ``P`` inside it) is routed, by a method interceptor, to a clone of that
BatchNorm owned by the wrapper (same fields, own variables), one per call site: call k of
a forward pass goes to ``<P>_site<k-1>``. The rest of the user's variables sit under
``inner``; :func:`site_variables` maps a model's variables onto that layout (each site
starting from the shared layer's parameters and statistics).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen

INNER = "inner"


def site_name(path: str, site: int) -> str:
    """The wrapper's child for call ``site + 1`` of the BatchNorm at dotted ``path``."""
    return f"{path.replace('.', '_')}_site{site}"


class SiteSplit(linen.Module):
    """``inner`` with the BatchNorms at ``splits`` (``(dotted path, call sites)`` pairs)
    one per call site; see the module docs. A forward pass calls each shared layer as
    often as it has sites: call k goes to site (k - 1) mod sites."""

    inner: linen.Module
    splits: tuple[tuple[str, int], ...]

    @linen.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wanted = dict(self.splits)
        turns: dict[str, int] = {}

        def route(next_fun: Any, call_args: tuple, call_kwargs: dict, context: Any) -> Any:
            path = ".".join(str(part) for part in context.module.path[1:])
            if context.method_name != "__call__" or context.module.path[:1] != (INNER,) or path not in wanted:
                return next_fun(*call_args, **call_kwargs)
            turn = turns.get(path, 0)
            turns[path] = turn + 1
            site = context.module.clone(parent=self, name=site_name(path, turn % wanted[path]))
            return site(*call_args, **call_kwargs)

        with linen.intercept_methods(route):
            return self.inner(*args, **kwargs)


def routed(module: linen.Module) -> bool:
    """Whether a :class:`SiteSplit` above the bound ``module`` sends its calls to a site
    (the shared layer's own call never runs: recorders of calls skip it)."""
    node = module.parent
    while isinstance(node, linen.Module):
        if isinstance(node, SiteSplit):
            below = module.path[len(node.path) :]
            return below[:1] == (INNER,) and ".".join(map(str, below[1:])) in dict(node.splits)
        node = node.parent
    return False


def mode_call(module: linen.Module) -> Any:
    """The method whose signature names the module's mode argument (``train=...``): the
    wrapped module's for a :class:`SiteSplit`, which passes its arguments through."""
    return module.inner.__call__ if isinstance(module, SiteSplit) else module.__call__


def _without(tree: Mapping[str, Any], parts: list[str]) -> dict[str, Any]:
    """``tree`` less the entry at ``parts`` (and any folder that leaves empty)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key != parts[0]:
            out[key] = value
        elif len(parts) > 1 and isinstance(value, Mapping):
            rest = _without(value, parts[1:])
            if rest:
                out[key] = rest
    return out


def _entry(tree: Mapping[str, Any], parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def site_variables(variables: Mapping[str, Any], splits: tuple[tuple[str, int], ...]) -> dict[str, Any]:
    """``variables`` of the user's module laid out for ``SiteSplit(module, splits)``: every
    collection's entries under ``inner``, each split layer's entries copied to its sites
    (new mappings; the arrays are shared, and jax arrays are never written to)."""
    out: dict[str, Any] = {}
    for collection, tree in variables.items():
        inner = dict(tree)
        for path, _ in splits:
            inner = _without(inner, path.split("."))
        new: dict[str, Any] = {INNER: inner} if inner else {}
        for path, calls in splits:
            entry = _entry(tree, path.split("."))
            if entry is not None:
                new.update({site_name(path, k): entry for k in range(calls)})
        out[collection] = new
    return out
