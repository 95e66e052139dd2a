"""``watch``: observe the user's own training loop (PyTorch or Chainer), then diagnose.

    with bnlab.doctor.watch(model) as w:
        for x, y in loader:
            ...  # forward, backward, step, as usual
    print(w.report())

While the block runs, hooks record every forward pass of ``model``: how often each
norm layer is called, in which mode, on how many values per channel. A forward pass
after which the parameters changed (before the next pass) counts as a training step.
On exit the hooks are removed, and the model is probed (on a copy) with the latest of
the largest training batches, so the report carries the same evidence as ``check``,
plus what only the loop could show: BN layers left in eval mode while training, tiny
batches. Parameter changes are detected from tensor version counters and sums (torch)
or array sums (Chainer), so any optimizer works.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bnlab.doctor import checks, fixes, thresholds
from bnlab.doctor.findings import Finding, Report
from bnlab.doctor.frameworks import detect
from bnlab.doctor.records import CallRecord, ProbeResult, TrainLog

if TYPE_CHECKING:
    from torch import nn


@dataclass
class _Pass:
    fingerprint: tuple
    inputs: tuple | None


@dataclass
class _Smallest:
    values: int
    batch_size: int
    site: str
    passes: int = 1


def _torch_fingerprint(model: nn.Module) -> tuple:
    """Changes whenever an optimizer updates a parameter.

    Version counters catch in-place updates (every torch.optim optimizer); the sums
    also catch updates through ``.data``, which bypass the counters.
    """
    import torch

    with torch.no_grad():
        params = list(model.parameters())
        versions = tuple(p._version for p in params)
        sums = tuple(float(p.detach().double().sum()) for p in params)
    return versions, sums


def _chainer_fingerprint(model: Any) -> tuple:
    """Chainer optimizers update parameter arrays in place: their sums move."""
    return tuple(None if p.array is None else float(p.array.sum()) for p in model.params())


class _TorchBackend:
    def __init__(self, model: nn.Module, on_pass_start: Any) -> None:
        from bnlab.doctor import torch_probe

        self.model = model
        self.recorder = torch_probe.Recorder(model, on_pass_start=on_pass_start)

    def fingerprint(self) -> tuple:
        return _torch_fingerprint(self.model)

    def probe(self, inputs: tuple, modes: dict[str, bool]) -> ProbeResult:
        from bnlab.doctor import torch_probe

        return torch_probe.probe(self.model, inputs, modes=modes)


class _ChainerBackend:
    def __init__(self, model: Any, on_pass_start: Any) -> None:
        from bnlab.doctor import chainer_probe

        self.model = model
        self.recorder = chainer_probe.Recorder(model, on_pass_start=on_pass_start)

    def fingerprint(self) -> tuple:
        return _chainer_fingerprint(self.model)

    def probe(self, inputs: tuple, modes: dict[str, bool]) -> ProbeResult:
        from bnlab.doctor import chainer_probe

        return chainer_probe.probe(self.model, inputs[0], modes=modes)


def _is_array(value: Any) -> bool:
    shape = getattr(value, "shape", None)
    # A torch tensor's shape is a torch.Size, a tuple: no torch import needed to tell.
    return isinstance(shape, tuple)


def _batch(inputs: tuple | None) -> int:
    if not inputs:
        return -1
    array = next((a for a in inputs if _is_array(a)), None)
    return int(array.shape[0]) if array is not None and len(array.shape) else -1


class Watch:
    """Context manager returned by :func:`watch`."""

    def __init__(self, model: Any) -> None:
        self.framework = detect(model)  # TypeError for anything else
        backend = _TorchBackend if self.framework == "torch" else _ChainerBackend
        self.model = model
        self.passes = 0
        self.steps = 0
        self._backend = backend(model, self._pass_start)
        self._recorder = self._backend.recorder
        self._current: _Pass | None = None
        self._last_step_inputs: tuple | None = None
        self._last_inputs: tuple | None = None
        self._eval_steps: Counter[str] = Counter()
        self._step_modes: dict[str, bool] = {}
        self._smallest: dict[str, _Smallest] = {}
        self._report: Report | None = None
        self._failure: Exception | None = None

    # -- context manager ---------------------------------------------------------
    def __enter__(self) -> Watch:
        self._recorder.attach()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._settle()
        finally:
            self._recorder.detach()
        try:
            self._report = self._build_report()
        except Exception as err:  # noqa: BLE001 - never hide the user's own exception
            self._failure = err

    def report(self) -> Report:
        """The findings; available after the ``with`` block."""
        if self._failure is not None:
            raise RuntimeError(
                f"bnlab doctor could not build the report: {self._failure}"
            ) from self._failure
        if self._report is None:
            raise RuntimeError(
                "the report is available once the `with watch(model)` block has ended"
            )
        return self._report

    # -- hooks ---------------------------------------------------------------------
    def _pass_start(self, args: tuple) -> None:
        """Called by the recorder as a forward pass of the model begins."""
        fingerprint = self._backend.fingerprint()
        self._settle(fingerprint)
        arrays = [a for a in args if _is_array(a)]
        self._current = _Pass(fingerprint, tuple(args) if arrays else None)
        self.passes += 1

    def _settle(self, fingerprint: tuple | None = None) -> None:
        """Close the pass in progress: was it a training step, and what did BN see?"""
        current, calls = self._current, list(self._recorder.calls)
        self._recorder.calls.clear()  # bounded memory over long loops
        self._current = None
        if current is None:
            return
        self._last_inputs = current.inputs or self._last_inputs
        self._note_calls(calls)
        if (fingerprint or self._backend.fingerprint()) == current.fingerprint:
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
            if call.training and call.values_per_channel < thresholds.SMALL_BATCH_WARN:
                best = small.get(call.path)
                if best is None or call.values_per_channel < best.values_per_channel:
                    small[call.path] = call
        for path, call in small.items():
            seen = self._smallest.setdefault(
                path, _Smallest(call.values_per_channel, call.batch_size, call.site, passes=0)
            )
            seen.passes += 1
            if call.values_per_channel < seen.values:
                seen.values, seen.batch_size, seen.site = (
                    call.values_per_channel, call.batch_size, call.site)

    # -- the report -------------------------------------------------------------------
    def _build_report(self) -> Report:
        inputs = self._last_step_inputs or self._last_inputs
        notes = [f"watched {self.passes} forward passes, {self.steps} training steps"]
        if inputs is None:
            notes.append("no tensor input was seen, so the model could not be probed")
            return Report(model=type(self.model).__name__, framework=self.framework, notes=notes)
        probe = self._backend.probe(inputs, self._step_modes)
        probe.train_log = TrainLog(
            steps=self.steps, where="in your training loop", eval_mode_steps=dict(self._eval_steps)
        )
        report = checks.run_checks(probe, source="(last training batch seen by watch)")
        findings = [f for f in report.findings if f.check != "small-batch"]
        findings += self._small_batch_findings(probe)
        findings += self._eval_mode_findings(probe, findings)
        return Report(
            findings=findings,
            model=report.model,
            framework=report.framework,
            probe={**report.probe, "watched_passes": self.passes, "watched_steps": self.steps},
            summary=report.summary,
            notes=notes + report.notes,
        )

    def _small_batch_findings(self, probe: Any) -> list[Finding]:
        findings = []
        for path, seen in self._smallest.items():
            layer = probe.layers.get(path)
            if layer is None or not layer.is_batchnorm:
                continue
            if seen.values < thresholds.SMALL_BATCH_WARN:
                findings.append(
                    checks.small_batch_finding(
                        layer, seen.values, seen.batch_size, seen.site,
                        seen=f"in your loop ({seen.passes} train-mode pass(es) this small), "
                        "smallest",
                    )
                )
        return findings

    def _eval_mode_findings(self, probe: Any, existing: list[Finding]) -> list[Finding]:
        """BN in eval mode during steps, when check 4 has not already made it an error."""
        covered = {f.where for f in existing if f.check == "stats-never-updated"}
        layers = {  # in model order
            path: self._eval_steps[path]
            for path in probe.layers
            if path in self._eval_steps
            and path not in covered
            and not probe.layers[path].params_frozen  # frozen + eval: deliberately frozen
        }
        if not layers:
            return []
        fix = (
            "Train under chainer.using_config('train', True) (the default), or freeze the "
            "layers completely (disable_update()) if intended."
            if self.framework == "chainer"
            else "Call model.train() before each training step (after validation), or freeze "
            "the layers completely (requires_grad=False) if intended."
        )
        return [
            Finding(
                check="eval-mode-training",
                severity="warning",
                title="BN layers were in eval mode during training steps",
                where=", ".join(layers),
                evidence=[
                    f"{path}: in eval mode in {count} of {self.steps} training steps"
                    for path, count in layers.items()
                ]
                + ["their parameters are trainable, but their running statistics did not "
                   "follow those steps"],
                data={"eval_mode_steps": layers, "steps": self.steps},
                consequence=(
                    "The layers normalize with frozen statistics while the weights before "
                    "them change, so their statistics go stale."
                ),
                fix=fix,
                fix_code=fixes.train_mode_during_training(self.framework),
            )
        ]


def watch(model: Any) -> Watch:
    """Watch the user's own training loop on ``model`` (PyTorch or Chainer); see module docs."""
    return Watch(model)
