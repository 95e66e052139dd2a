"""``watch``: observe the user's own training loop (PyTorch or Chainer), then diagnose.

    with bnlab.doctor.watch(model, optimizer=opt) as w:
        for x, y in loader:
            ...  # forward, backward, step, as usual
    print(w.report())

While the block runs, the backend's light hooks note every forward pass of ``model``:
how often each norm layer is called, in which mode, on how many samples; a forward pass
after which an optimizer step happened (before the next pass) counts as a training step.
Norm calls outside any forward pass (activation checkpointing's recomputation) and
running statistics that change without their layer being called are counted too. No
activation is read and nothing waits on the device per step.

On exit the hooks are removed, and the model is probed (on a copy) with the latest of
the largest training batches, so the report carries the same evidence as ``check``, plus
what only the loop could show: BN layers left in eval mode while training, tiny batches,
statistics updated twice per step, weight decay on BN parameters (``optimizer=``, or
the torch optimizer seen stepping the model).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from bnlab.doctor import ranks
from bnlab.doctor.backend import Backend, Watcher
from bnlab.doctor.backends import detect
from bnlab.doctor.checks.small_batch import too_small
from bnlab.doctor.diagnose import run_checks
from bnlab.doctor.errors import quote_error
from bnlab.doctor.findings import Report
from bnlab.doctor.records import CallRecord, RanksInfo, RankView, SmallCall, TrainLog


@dataclass
class _Pass:
    marker: object
    inputs: tuple | None


_print_now = partial(print, flush=True)


def _is_array(value: Any) -> bool:
    shape = getattr(value, "shape", None)
    return isinstance(shape, tuple) or type(shape).__name__ == "Size"


def _batch(inputs: tuple | None) -> int:
    if not inputs:
        return -1
    array = next((a for a in inputs if _is_array(a)), None)
    return int(array.shape[0]) if array is not None and len(array.shape) else -1


class Watch:
    """Context manager returned by :func:`watch`.

    ``echo``: where rank 0 of a multi-process job sends the text report (``None``: nowhere;
    a caller such as the Lightning callback then prints it itself)."""

    def __init__(self, model: Any, optimizer: Any = None, *, echo: Callable[[str], Any] | None = _print_now) -> None:
        self._backend: Backend = detect(model)  # UnsupportedModel (a TypeError) otherwise
        self.framework = self._backend.NAME
        self.model = model
        self.passes = 0
        self.steps = 0
        self._watcher: Watcher = self._backend.watcher(model, self._pass_start, optimizer)
        self._current: _Pass | None = None
        self._last_step_inputs: tuple | None = None
        self._last_inputs: tuple | None = None
        self._eval_steps: Counter[str] = Counter()
        self._step_modes: dict[str, bool] = {}
        self._smallest: dict[str, SmallCall] = {}
        self._report: Report | None = None
        self._failure: Exception | None = None
        self._ranks = getattr(self._watcher, "ranks", None)  # a DDP job's ranks (torch_distributed)
        self._rank_info: RanksInfo | None = None
        self._echo = echo

    # -- context manager ---------------------------------------------------------
    def __enter__(self) -> Watch:
        self._watcher.attach()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._settle()
        finally:
            self._watcher.detach()
            if self._ranks is not None:  # on every rank, whatever happened: the others wait for it
                self._rank_info = self._ranks.exchange(self._rank_view(exc))
        try:
            self._report = self._build_report()
        except Exception as err:  # noqa: BLE001 - never hide the user's own exception
            self._failure = err
        if self._echo is not None and self._rank_info is not None and self._rank_info.rank == 0:
            # one rank prints, all return it
            self._echo(
                self._report.to_text() if self._report is not None else f"bnlab doctor: no report ({self._failure})"
            )

    def report(self) -> Report:
        """The findings; available after the ``with`` block."""
        if self._failure is not None:
            raise RuntimeError(f"bnlab doctor could not build the report: {self._failure}") from self._failure
        if self._report is None:
            raise RuntimeError("the report is available once the `with watch(model)` block has ended")
        return self._report

    @property
    def ranks(self) -> RanksInfo | None:
        """What the ranks of a DDP job exchanged at the end of the block (None elsewhere)."""
        return self._rank_info

    # -- hooks ---------------------------------------------------------------------
    def _pass_start(self, args: tuple) -> None:
        """Called by the watcher as a forward pass of the model begins."""
        marker = self._watcher.step_marker()
        self._settle(marker)
        arrays = [a for a in args if _is_array(a)]
        self._current = _Pass(marker, tuple(args) if arrays else None)
        self.passes += 1

    def _settle(self, marker: object = None) -> None:
        """Close the pass in progress: was it a training step, and what did BN see?"""
        current, calls = self._current, list(self._watcher.calls)
        self._watcher.calls.clear()  # bounded memory over long loops
        self._current = None
        if current is None:
            return
        self._last_inputs = current.inputs or self._last_inputs
        self._note_calls(calls)
        if (marker if marker is not None else self._watcher.step_marker()) == current.marker:
            return
        self.steps += 1
        if current.inputs is not None and _batch(current.inputs) >= _batch(self._last_step_inputs):
            # the most recent of the largest batches: a final partial batch is a poor probe
            self._last_step_inputs = current.inputs
        for call in calls:
            self._step_modes[call.path] = call.training
        for path in dict.fromkeys(call.path for call in calls if not call.training):
            self._eval_steps[path] += 1

    def _note_calls(self, calls: list[CallRecord]) -> None:
        small: dict[str, CallRecord] = {}  # smallest train-mode call per layer, this pass
        for call in calls:
            # batch_size -1: a compiled step traced for any batch size (Keras fit)
            if call.training and call.batch_size >= 0 and too_small(call.batch_size, call.values_per_channel):
                best = small.get(call.path)
                if best is None or call.values_per_channel < best.values_per_channel:
                    small[call.path] = call
        for path, call in small.items():
            seen = self._smallest.setdefault(
                path, SmallCall(call.batch_size, call.values_per_channel, call.site, passes=0)
            )
            seen.passes += 1
            if (call.batch_size, call.values_per_channel) < (seen.samples, seen.values):
                seen.samples, seen.values, seen.site = (call.batch_size, call.values_per_channel, call.site)

    # -- the report -------------------------------------------------------------------
    def _inputs_after_training(self) -> tuple[tuple, str] | None:
        # Compiled steps (Keras fit on TensorFlow or JAX) show Python only symbolic
        # inputs; such a watcher finds a training batch (and says which) once training is over.
        later = getattr(self._watcher, "inputs_after_training", None)
        return None if later is None else later()

    def _rank_view(self, exc: object) -> RankView:
        raised = quote_error(exc) if isinstance(exc, BaseException) else ("" if exc is None else str(exc))
        batch = _batch(self._last_step_inputs)
        return RankView(
            rank=-1, steps=self.steps, passes=self.passes, batch=batch, smallest=dict(self._smallest), raised=raised
        )

    def _build_report(self) -> Report:
        source = "(last training batch seen by watch)"
        inputs = self._last_step_inputs or self._last_inputs
        if inputs is None:
            inputs, source = self._inputs_after_training() or (None, "")
        notes = [f"watched {self.passes} forward passes, {self.steps} training steps"]
        notes += ranks.notes(self._rank_info) if self._rank_info is not None else []
        if inputs is None:
            notes.append("no tensor input was seen, so the model could not be probed")
            return Report(model=type(self.model).__name__, framework=self.framework, notes=notes)
        target = self._ranks.module if self._ranks is not None else self.model  # DDP: the module it wraps
        probe = self._backend.probe(target, inputs, modes=self._step_modes)
        probe.ranks = self._rank_info
        probe.train_log = TrainLog(
            steps=self.steps,
            where="in your training loop",
            eval_mode_steps=dict(self._eval_steps),
            watched=True,
            updates=self._watcher.updates(),
            smallest=self._smallest,
            # named on the probed module: a DDP model's own names carry its "module." prefix
            optimizer=self._backend.describe_optimizer(target, self._watcher.optimizer()),
        )
        report = run_checks(probe, self._backend.fixes, source=source)
        report.probe.update({"watched_passes": self.passes, "watched_steps": self.steps})
        report.notes = notes + report.notes
        return report


def watch(model: Any, optimizer: Any = None) -> Watch:
    """Watch the user's own training loop on ``model`` (PyTorch or Chainer); see module docs.

    ``optimizer``: the loop's optimizer, to check its weight decay on BN parameters (a
    torch optimizer stepping the model is also found without it).

    In a DistributedDataParallel job, give each rank's DDP model: at the end of the block
    the ranks compare their statistics and batches (bounded in time, see
    :mod:`bnlab.doctor.backends.torch.distributed`); rank 0 prints the report, every rank returns it.
    """
    return Watch(model, optimizer)
