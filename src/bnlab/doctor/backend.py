"""The doctor's ``Backend`` protocol: everything a framework does for the doctor.

One class per framework implements it, in its own folder under
:mod:`bnlab.doctor.backends` (``backends/<name>/__init__.py`` assigns an instance to
``BACKEND: Backend``, so mypy rejects a backend that forgets a method). The rest of the
doctor receives the ``Backend`` object chosen once by :func:`bnlab.doctor.backends.detect`
and never asks which framework it is talking to.

This module is framework-free: it imports no framework and names none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bnlab.doctor.records import CallRecord, LayerInfo, OptimizerInfo, ProbeResult, StatUpdates

# A labelled batch (inputs, labels); labels may be None where only inputs are needed.
Batch = tuple[Any, Any]
# What a repair changed: one dict per layer ({"change": "split" | "re-estimated" | "kept", ...}).
Change = dict[str, Any]


class Watcher(Protocol):
    """Hooks on the user's model while their own loop runs.

    Nothing here may wait on the device per step: counts are kept on the host, the
    running statistics are compared once, at :meth:`updates`.
    """

    @property
    def calls(self) -> list[CallRecord]:
        """Norm calls since the last take (statistics not measured); the caller clears it."""
        ...

    @property
    def extra_calls(self) -> Mapping[str, int]:
        """Train-mode norm calls outside any forward pass, per layer path."""
        ...

    def attach(self) -> None: ...

    def detach(self) -> None: ...

    def step_marker(self) -> object:
        """Changes whenever an optimizer step has updated the model (cheap, host only)."""
        ...

    def updates(self) -> dict[str, StatUpdates]:
        """Per norm layer: how its running statistics moved since :meth:`attach`."""
        ...

    def optimizer(self) -> Any:
        """The optimizer seen stepping the model (or given), None if unknown."""
        ...


class Fixes(Protocol):
    """Code sketches (and one sentence) shown under findings, in the framework's own API.

    They are sketches to adapt, named after the user's own layers where known.
    """

    def one_bn_per_site(self, layer: LayerInfo, calls: list[CallRecord]) -> str:
        """Give each call site of a shared BN its own layer."""
        ...

    def recompute_stats(self) -> str:
        """Re-estimate stale running statistics on training data."""
        ...

    def reset_stats(self) -> str:
        """Re-estimate running statistics that were reset (or never loaded)."""
        ...

    def train_mode_during_training(self) -> str:
        """Run the training steps in training mode."""
        ...

    def train_mode_advice(self) -> str:
        """One sentence: how to train in training mode, or freeze on purpose."""
        ...

    def rate_code(self, layer: LayerInfo, value: float) -> str:
        """Set the layer's momentum/decay to ``value``."""
        ...

    def no_decay_on_norms(self) -> str:
        """Exclude norm parameters from weight decay."""
        ...

    def checkpoint_without_bn_updates(self) -> str:
        """Keep BN out of activation checkpointing (recomputed forwards)."""
        ...

    def no_bias(self, kinds: list[str]) -> str:
        """Drop the bias of the layer feeding a BN."""
        ...

    def dropout_after_bn(self) -> str: ...

    def freeze_bn(self) -> str:
        """Freeze a BN completely (statistics too)."""
        ...

    def sync_bn(self) -> str:
        """Synchronise BN statistics across data-parallel replicas."""
        ...

    def bigger_batches(self) -> str: ...


class Backend(Protocol):
    """What the doctor needs from one framework.

    Implementations must not import their framework at module level: :meth:`owns` looks
    the framework up in ``sys.modules`` (or reads class module names), so
    ``import bnlab.doctor`` stays cheap and optional frameworks stay optional.
    """

    NAME: str  # the registry name: "torch", "keras", ...
    WEIGHTS_NAME: str  # the file --fix writes the repaired weights to: "model.pt"

    @property
    def fixes(self) -> Fixes:
        """The code sketches shown under findings, in this framework's API."""
        ...

    # -- recognise, copy, seed ---------------------------------------------------------

    def owns(self, model: Any) -> bool:
        """Whether ``model`` is this framework's model (never imports the framework)."""
        ...

    def copy(self, model: Any) -> Any:
        """A throwaway copy of ``model`` to run trials on (never the user's object)."""
        ...

    def seed(self, seed: int) -> None:
        """Seed the framework's own random generators (Python's and numpy's are seeded
        by the caller)."""
        ...

    def has_own_name(self, model: Any) -> bool:
        """False when the report's name for ``model`` would be only its framework's default
        (Keras's "functional", "sequential_2"); the command line then says NAME of FILE.py:NAME."""
        ...

    # -- inputs --------------------------------------------------------------------------

    def runs_on(self, model: Any, x: np.ndarray) -> bool:
        """Whether a throwaway copy of ``model`` runs on the float32 array ``x`` in eval
        / inference mode (nothing of ``model`` is updated)."""
        ...

    def eval_output(self, model: Any, x: np.ndarray) -> np.ndarray | None:
        """The first output of a throwaway copy of ``model`` on ``x`` in eval mode, as
        numpy (None when the output holds no array); raises what the model raises."""
        ...

    # -- probe, train, watch ------------------------------------------------------------

    def probe(
        self,
        model: Any,
        inputs: Any,
        *,
        labels: Any = None,
        train_steps: int = 0,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        optimizer_factory: Callable[..., Any] | None = None,
        train_batches: Iterable[tuple[Any, Any]] | None = None,
        lr: float = 0.01,
        modes: dict[str, bool] | None = None,
    ) -> ProbeResult:
        """Everything the checks need, measured on a copy of ``model``; with
        ``train_steps`` the copy is trained first and ``ProbeResult.given`` holds the
        observations of the model as handed over."""
        ...

    def watcher(self, model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Watcher:
        """Hooks for :func:`bnlab.doctor.watch` (not attached yet)."""
        ...

    def describe_optimizer(self, model: Any, optimizer: Any) -> OptimizerInfo | None:
        """``OptimizerInfo`` of ``optimizer`` on ``model`` (None when it can't tell)."""
        ...

    # -- repair ---------------------------------------------------------------------------

    def check_repairable(self, model: Any) -> None:
        """A UsageError now, before any work, for a model the repair cannot take."""
        ...

    def repair(
        self, model: Any, batches: list[Batch], *, split: Iterable[str] | None = None
    ) -> tuple[Any, list[Change]]:
        """A NEW model (shared BNs split per call site, running statistics re-estimated
        over ``batches`` in train mode) and what changed; ``model`` is not touched."""
        ...

    def split_shared(self, model: Any, calls: dict[str, int]) -> Any:
        """A copy of ``model`` with one BN per call site (``calls``: path -> call sites)."""
        ...

    def evaluate(self, model: Any, batches: list[Batch]) -> dict[str, Any]:
        """Eval-mode ``val_acc``, ``val_loss`` and ``train_eval_agreement`` on ``batches``."""
        ...

    # -- weights on disk ------------------------------------------------------------------

    def load_checkpoint(self, model: Any, path: Path, notes: list[str] | None = None) -> Any:
        """Load trained weights from ``path`` into ``model`` (freshly built by the doctor),
        reading no pickles; an InputError naming the file and the fix otherwise. Returns
        the loaded model: ``model`` itself, or a new one where the framework keeps weights
        outside the model (flax.linen: a ``(module, variables)`` pair). ``notes`` gets a
        line for the report per liberty taken reading the file (a wrapper's key prefix
        dropped)."""
        ...

    def save_weights(self, model: Any) -> bytes:
        """The bytes of :attr:`WEIGHTS_NAME` for ``model``."""
        ...

    def how_to_load(self, changes: list[Change], weights: Path, target: str, mlp_config: Any) -> str:
        """``HOW_TO_LOAD.txt``: how to load ``weights`` (a repaired ``target``) back.
        ``mlp_config``: the ModelConfig (as a dict) of bnlab's own MLP, else None."""
        ...
