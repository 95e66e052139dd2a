"""The checks: what a probe's records mean, as findings with evidence.

Each ``check_*`` function reads a :class:`ProbeResult` and returns findings; none of
them touches a model. :func:`run_checks` runs all of them and builds the report.
Thresholds live in :mod:`bnlab.doctor.thresholds`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from bnlab.conventions import from_torch_momentum, to_torch_momentum
from bnlab.doctor import fixes, thresholds
from bnlab.doctor.findings import Finding, Report
from bnlab.doctor.records import CallRecord, LayerInfo, ProbeResult
from bnlab.doctor.stats import Distance, distance, site_distance, sites_alike


# -- shared helpers -----------------------------------------------------------


def _tracked(layer: LayerInfo) -> bool:
    return layer.tracks_running_stats and layer.running_mean is not None


def _vs_running(call: CallRecord, layer: LayerInfo) -> Distance | None:
    if layer.running_mean is None or layer.running_var is None:
        return None
    return distance(call.mean, call.var, layer.running_mean, layer.running_var, layer.eps)


def _called(probe: ProbeResult, path: str) -> bool:
    return bool(probe.calls_of(path)) or probe.eval_calls.get(path, 0) > 0


def _untrained(probe: ProbeResult) -> list[LayerInfo]:
    """Layers whose statistics were never updated and that we did not train either."""
    if probe.trained:
        return []
    return [
        layer
        for layer in probe.layers.values()
        if layer.is_batchnorm and layer.at_init and _called(probe, layer.path)
    ]


def divergence(probe: ProbeResult) -> dict[str, float] | None:
    """Share of samples whose class differs between train-mode and eval-mode BN."""
    if probe.train_pred is None or probe.eval_pred is None:
        return None
    result = {
        "differ": float(np.mean(probe.train_pred != probe.eval_pred)),
        "samples": int(probe.train_pred.size),
    }
    if probe.labels is not None and probe.labels.size == probe.train_pred.size:
        labels = probe.labels.reshape(probe.train_pred.shape)
        result["acc_train"] = float(np.mean(probe.train_pred == labels))
        result["acc_eval"] = float(np.mean(probe.eval_pred == labels))
    return result


def _divergence_line(div: dict[str, float]) -> str:
    line = (
        f"train vs eval mode: {div['differ']:.1%} of {div['samples']} probe predictions differ"
    )
    if "acc_train" in div:
        line += (
            f"; accuracy {div['acc_train']:.3f} (train mode) vs "
            f"{div['acc_eval']:.3f} (eval mode)"
        )
    return line


# -- check 1: shared stateful normalization -----------------------------------


def check_shared(probe: ProbeResult) -> list[Finding]:
    findings = []
    div = divergence(probe)
    for path, layer in probe.layers.items():
        calls = probe.calls_of(path)
        count = max(len(calls), probe.eval_calls.get(path, 0))
        if count < 2 or not _tracked(layer):
            # Sharing a norm without running statistics (or a stateless module) is fine.
            continue
        findings.append(_shared_finding(probe, layer, calls, count, div))
    return findings


def _shared_finding(
    probe: ProbeResult,
    layer: LayerInfo,
    calls: list[CallRecord],
    count: int,
    div: dict[str, float] | None,
) -> Finding:
    evidence = [
        f"called {count} times in one forward pass, one set of running statistics "
        f"({layer.rate_name}={layer.rate}, eps={layer.eps:g})"
    ]
    site_data = []
    for call in calls:
        dist = _vs_running(call, layer)
        if dist is None:
            continue
        evidence.append(
            f"call {call.index} {call.site}: batch vs running statistics: {dist.describe()}"
        )
        site_data.append({"index": call.index, "site": call.site, "producer": call.producer,
                          **dist.as_dict()})
    between = [
        site_distance(a.mean, a.var, b.mean, b.var, layer.eps)
        for i, a in enumerate(calls)
        for b in calls[i + 1:]
        if a.mean.shape == b.mean.shape
    ]
    worst = max(between, key=lambda d: d.mean_shift + abs(np.log(d.var_ratio)), default=None)
    if worst is not None:
        evidence.append(
            f"the call sites see different activations: means {worst.mean_shift:.2f} SD apart "
            f"(max {worst.max_mean_shift:.2f}), variances differ by a factor {worst.var_ratio:.2f}"
        )
    if layer.at_init:
        evidence.append("the running statistics are still at their initial values (0, 1)")
    if div is not None:
        evidence.append(_divergence_line(div))
    alike = worst is not None and all(sites_alike(d) for d in between)
    severity = "warning" if alike else "error"
    consequence = (
        "In eval mode every call site is normalized with the same running statistics, a blend "
        "of all sites' activations, so the deployed model computes a different function than "
        "the one trained with batch statistics."
    )
    if alike:
        consequence = (
            "The call sites currently see alike activations, so one set of running statistics "
            "can describe them; if their inputs drift apart, eval mode breaks."
        )
    return Finding(
        check="shared-bn",
        severity=severity,
        title=f"{layer.kind} '{layer.path}' is called {count} times per forward pass",
        where=layer.path,
        sites=[f"call {call.index} {call.site}" for call in calls],
        evidence=evidence,
        data={
            "calls": count,
            "sites": site_data,
            "between_sites": worst.as_dict() if worst else None,
            "train_eval": div,
        },
        consequence=consequence,
        fix="Give each call site its own BatchNorm layer.",
        fix_code=fixes.one_bn_per_site(layer, calls),
    )


# -- check 2: running statistics that don't describe the activations ----------


def check_stale(probe: ProbeResult) -> list[Finding]:
    findings = []
    for path, layer in probe.layers.items():
        calls = probe.calls_of(path)
        if (
            len(calls) != 1  # shared layers are reported, with these numbers, by check 1
            or not _tracked(layer)
            or not layer.is_batchnorm
            or layer.at_init  # never updated: check 4's business
            or calls[0].values_per_channel < thresholds.MIN_VALUES_FOR_STATS
        ):
            continue
        dist = _vs_running(calls[0], layer)
        if dist is not None and dist.is_off():
            findings.append(_stale_finding(probe, layer, calls[0], dist))
    return findings


def _stale_finding(
    probe: ProbeResult, layer: LayerInfo, call: CallRecord, dist: Distance
) -> Finding:
    return Finding(
        check="stale-stats",
        severity="warning",
        title=f"running statistics of '{layer.path}' don't describe its input",
        where=layer.path,
        sites=[call.site],
        evidence=[
            f"probe batch ({call.values_per_channel} values per channel) vs running "
            f"statistics: {dist.describe()}",
            f"thresholds: mean shift > {thresholds.MEAN_SHIFT_WARN} SD or variance ratio "
            f"outside [{thresholds.VAR_RATIO_LOW}, {thresholds.VAR_RATIO_HIGH}]",
        ],
        data={"site": call.site, **dist.as_dict(), "values_per_channel": call.values_per_channel},
        consequence=(
            "In eval mode this layer normalizes with statistics of a different distribution, "
            "so the next layer receives shifted, rescaled activations it was not trained on."
        ),
        fix=(
            "Re-estimate the running statistics on training data (too few updates, stale "
            "statistics from another data set or a changed preprocessing all show up here), "
            "and check that the probe data is preprocessed like the training data."
        ),
        fix_code=fixes.recompute_stats(layer.framework),
    )


# -- check 3: train/eval divergence -------------------------------------------


def check_divergence(probe: ProbeResult) -> list[Finding]:
    div = divergence(probe)
    if div is None or div["differ"] <= thresholds.DIVERGENCE_WARN:
        return []
    untrained = _untrained(probe)
    evidence = [_divergence_line(div)]
    shared = [p for p, layer in probe.layers.items()
              if _tracked(layer) and len(probe.calls_of(p)) > 1]
    if shared:
        evidence.append(f"shared BN layers (see shared-bn): {', '.join(shared)}")
    if untrained:
        evidence.append(
            "running statistics still at their initial values in: "
            + ", ".join(layer.path for layer in untrained)
        )
    return [
        Finding(
            check="train-eval-divergence",
            severity="info" if untrained else "warning",
            title=(
                "train and eval mode disagree (expected: the model is untrained)"
                if untrained
                else "train mode and eval mode predict different classes"
            ),
            where="model output",
            evidence=evidence,
            data=div,
            consequence=(
                "The eval-mode model you deploy is not the model you watched during training: "
                "it uses running statistics where training used batch statistics."
            ),
            fix=(
                "Fix the layers named by the other findings (shared BN, stale statistics, "
                "momentum); then the two modes agree to within a few percent."
                if not untrained
                else "Train the model (or pass train_steps / --train-steps) and check again."
            ),
        )
    ]


# -- check 4: statistics never updated ------------------------------------------


def check_never_updated(probe: ProbeResult) -> list[Finding]:
    if not probe.trained:
        return _untrained_info(probe)
    steps = probe.train_log.steps
    findings = []
    for path, layer in probe.layers.items():
        if not (_tracked(layer) and layer.is_batchnorm and _called(probe, path)):
            continue  # an unused layer is reported by check_unused
        if not layer.at_init:
            # Statistics that differ from the initial ones came from somewhere: training, or
            # a checkpoint (a deliberately frozen, pretrained BN). Not this check's business.
            continue
        evidence = [
            f"after {steps} training steps {probe.train_log.where}:",
            "running mean is all 0 and running variance all 1 (initial values)",
        ]
        if layer.num_batches_tracked == 0:
            evidence.append("num_batches_tracked is 0: no train-mode forward pass reached it")
        eval_steps = probe.train_log.eval_mode_steps.get(path, 0)
        if eval_steps:
            evidence.append(f"the layer was in eval mode in {eval_steps} of {steps} steps")
        if layer.rate == 0 or (layer.rate_name == "decay" and layer.rate == 1):
            evidence.append(f"{layer.rate_name}={layer.rate}: the update rate is zero")
        findings.append(
            Finding(
                check="stats-never-updated",
                severity="error",
                title=f"running statistics of '{path}' are never updated by training",
                where=path,
                evidence=evidence,
                data={"steps": steps, "at_init": layer.at_init, "eval_mode_steps": eval_steps,
                      "num_batches_tracked": layer.num_batches_tracked},
                consequence=(
                    "In eval mode the layer normalizes with mean 0 and variance 1, i.e. not at "
                    "all, so activations keep whatever scale training gave them."
                ),
                fix=(
                    "Keep BN layers in train mode while training (don't call eval() or override "
                    "train() to freeze them unless they hold pretrained statistics) and use a "
                    "non-zero update rate."
                ),
                fix_code=fixes.train_mode_during_training(layer.framework),
            )
        )
    return findings


def _untrained_info(probe: ProbeResult) -> list[Finding]:
    layers = _untrained(probe)
    if not layers:
        return []
    return [
        Finding(
            check="untrained-stats",
            severity="info",
            title="running statistics are at their initial values: the model looks untrained",
            where=", ".join(layer.path for layer in layers),
            evidence=[
                f"{len(layers)} BN layer(s) have running mean 0 and variance 1",
                "statistical checks of these layers (stale-stats) were skipped",
            ],
            data={"layers": [layer.path for layer in layers]},
            consequence=(
                "Eval-mode behaviour of an untrained model says nothing about the trained one."
            ),
            fix=(
                "Check the trained model, or let the doctor train a copy first "
                "(train_steps=N in the API, --train-steps N on the command line)."
            ),
        )
    ]


def check_unused(probe: ProbeResult) -> list[Finding]:
    """A norm layer that forward never calls: harmless alone, telling next to a shared one."""
    unused = [path for path in probe.layers if not _called(probe, path)]
    if not unused or not (probe.calls or probe.eval_calls):
        return []
    shared = [p for p in probe.layers if len(probe.calls_of(p)) > 1]
    evidence = [f"defined but not called in the forward pass: {', '.join(unused)}"]
    if shared:
        evidence.append(
            f"meanwhile {', '.join(shared)} is called several times: was "
            f"{unused[0]} meant for one of those calls?"
        )
    return [
        Finding(
            check="unused-bn",
            severity="info",
            title="normalization layer(s) never called",
            where=", ".join(unused),
            evidence=evidence,
            data={"unused": unused, "shared": shared},
            consequence="An unused layer does nothing; its parameters only take up space.",
            fix="Use it where it was meant to go, or delete it.",
        )
    ]


# -- check 5: momentum convention ---------------------------------------------


def check_momentum(probe: ProbeResult) -> list[Finding]:
    findings = []
    for path, layer in probe.layers.items():
        if not _tracked(layer) or layer.rate is None:
            continue
        finding = _momentum_finding(layer)
        if finding is not None:
            findings.append(finding)
    return findings


def _momentum_finding(layer: LayerInfo) -> Finding | None:
    rate = float(layer.rate)
    torch_equiv = to_torch_momentum(layer.framework, rate)  # weight of the new batch
    chainer = layer.framework == "chainer"
    if torch_equiv == 0:
        title = f"{layer.rate_name}={rate:g}: running statistics never change"
        detail = "each training batch gets weight 0 in the running average"
        converted = 0.9 if chainer else 0.1  # the frameworks' defaults
        fix = f"Use the default {layer.rate_name}={converted:g}."
    elif torch_equiv > thresholds.MOMENTUM_SUSPECT:
        title = f"{layer.rate_name}={rate:g} looks like another framework's convention"
        detail = (
            f"each training batch replaces {torch_equiv:.0%} of the running statistics, "
            "so they follow the last few batches almost exactly"
        )
        if chainer:
            # decay=0.1 is PyTorch's momentum=0.1 typed into Chainer.
            converted = from_torch_momentum("chainer", rate)
            fix = (
                f"Chainer's decay weights the OLD value. If you meant PyTorch's "
                f"momentum={rate:g}, use decay={converted:g} "
                f"(bnlab.conventions.from_torch_momentum('chainer', {rate:g}))."
            )
        else:
            # momentum=0.9 is Keras/TF/Chainer's 0.9 typed into PyTorch.
            converted = to_torch_momentum("keras", rate)
            fix = (
                f"PyTorch's momentum weights the NEW batch. If you meant Keras/TF/Chainer's "
                f"{rate:g}, use momentum={converted:g} "
                f"(bnlab.conventions.to_torch_momentum('keras', {rate:g}))."
            )
    else:
        return None
    converted = round(converted, 12)  # 1 - 0.9 prints as 0.1, not 0.09999999999999998
    return Finding(
        check="momentum-convention",
        severity="warning",
        title=title,
        where=layer.path,
        evidence=[detail, f"as a PyTorch momentum: {torch_equiv:g}"],
        data={layer.rate_name: rate, "torch_momentum": torch_equiv, "suggested": converted},
        consequence=(
            "Eval mode then uses statistics of the last batch (noisy) or of no batch at all "
            "instead of an average over training."
        ),
        fix=fix,
        fix_code=fixes.rate_code(layer, converted),
    )


# -- check 6: batch too small ---------------------------------------------------


def check_small_batch(probe: ProbeResult) -> list[Finding]:
    findings = []
    for path, layer in probe.layers.items():
        train_calls = [c for c in probe.calls_of(path) if c.training]
        if not layer.is_batchnorm or not train_calls:
            continue
        smallest = min(train_calls, key=lambda c: c.values_per_channel)
        if smallest.values_per_channel < thresholds.SMALL_BATCH_WARN:
            findings.append(small_batch_finding(layer, smallest.values_per_channel,
                                                smallest.batch_size, smallest.site))
    return findings


def small_batch_finding(
    layer: LayerInfo, values: int, batch_size: int, site: str, seen: str = "in the probe"
) -> Finding:
    """Check 6's finding; also used by ``watch`` for batches seen in the user's loop."""
    single = values <= 1
    return Finding(
        check="small-batch",
        severity="error" if single else "warning",
        title=(
            f"'{layer.path}' normalizes over {values} value(s) per channel in train mode"
        ),
        where=layer.path,
        sites=[site],
        evidence=[
            f"{seen}: batch of {batch_size} -> {values} value(s) per channel "
            f"(warning below {thresholds.SMALL_BATCH_WARN})"
        ],
        data={"values_per_channel": values, "batch_size": batch_size},
        consequence=(
            "With one value per channel the batch variance is 0: the output is beta for every "
            "input (PyTorch refuses with 'Expected more than 1 value per channel')."
            if single
            else "Batch statistics this noisy make training unstable and the running statistics "
            "a poor estimate."
        ),
        fix=(
            "Train with larger batches (drop a final partial batch), or use GroupNorm / "
            "LayerNorm, which don't depend on the batch."
        ),
        fix_code=fixes.bigger_batches(layer.framework),
    )


# -- check 7: info-level remarks ------------------------------------------------


def check_bias_before_bn(probe: ProbeResult) -> list[Finding]:
    pairs = []
    for call in probe.calls:
        layer = probe.layers[call.path]
        if call.producer_has_bias and call.via in ("direct", "view") and layer.is_batchnorm:
            pair = (call.producer, call.producer_kind, call.path)
            if pair not in pairs:
                pairs.append(pair)
    if not pairs:
        return []
    framework = probe.framework
    return [
        Finding(
            check="bias-before-bn",
            severity="info",
            title="bias directly before BN is redundant",
            where=", ".join(p[0] for p in pairs),
            sites=[f"{producer} ({kind}, with bias) -> {bn}" for producer, kind, bn in pairs],
            evidence=["BN subtracts the batch mean, which removes any constant bias"],
            data={"pairs": [{"producer": p, "kind": k, "bn": b} for p, k, b in pairs]},
            consequence="The bias is a wasted parameter: it never changes the BN's output.",
            fix="Create the layer without a bias.",
            fix_code=fixes.no_bias(framework, [p[1] for p in pairs]),
        )
    ]


def check_dropout_before_bn(probe: ProbeResult) -> list[Finding]:
    findings = []
    seen = set()
    for call in probe.calls:
        if not call.producer_is_dropout or call.path in seen:
            continue
        seen.add(call.path)
        findings.append(
            Finding(
                check="dropout-before-bn",
                severity="info",
                title=f"dropout directly before '{call.path}'",
                where=call.path,
                sites=[call.site],
                evidence=["dropout is active in train mode and off in eval mode"],
                consequence=(
                    "The running variance is learned with dropout noise that is absent in eval "
                    "mode (variance shift), so eval-mode activations are scaled differently."
                ),
                fix="Move dropout after the BN layers (e.g. just before the final classifier).",
                fix_code=fixes.dropout_after_bn(probe.framework),
            )
        )
    return findings


def check_frozen(probe: ProbeResult) -> list[Finding]:
    findings = []
    for path, layer in probe.layers.items():
        if not (layer.params_frozen and layer.training and _tracked(layer)):
            continue
        findings.append(
            Finding(
                check="frozen-bn-train-mode",
                severity="info",
                title=f"'{path}' has frozen parameters but is in train mode",
                where=path,
                evidence=["its affine parameters are not trained, yet its mode is train"],
                consequence=(
                    "Its running statistics still move with every training batch, so the layer "
                    "is not frozen: a frozen layer should also be in eval mode."
                ),
                fix="Put frozen BN layers in eval mode after every model.train() call.",
                fix_code=fixes.freeze_bn(layer.framework),
            )
        )
    return findings


def check_parallel(probe: ProbeResult) -> list[Finding]:
    info = probe.parallel
    if (
        info is None
        or not info.plain_bn
        or info.per_device_batch >= thresholds.PER_DEVICE_BATCH_INFO
    ):
        return []
    return [
        Finding(
            check="dataparallel-bn",
            severity="info",
            title=f"{info.wrapper} with plain BatchNorm and small per-device batches",
            where=", ".join(info.plain_bn),
            evidence=[
                f"{info.devices} device(s), about {info.per_device_batch} samples per device; "
                "each device normalizes over its own slice of the batch"
            ],
            data={"wrapper": info.wrapper, "devices": info.devices,
                  "per_device_batch": info.per_device_batch},
            consequence=(
                "Batch statistics come from a few samples per device: noisy training and "
                "noisy running statistics."
            ),
            fix="Use SyncBatchNorm so statistics are computed over the whole batch.",
            fix_code=fixes.sync_bn(),
        )
    ]


CHECKS: list[Callable[[ProbeResult], list[Finding]]] = [
    check_shared,
    check_stale,
    check_divergence,
    check_never_updated,
    check_unused,
    check_momentum,
    check_small_batch,
    check_bias_before_bn,
    check_dropout_before_bn,
    check_frozen,
    check_parallel,
]


def summary(probe: ProbeResult) -> dict:
    """Per-layer facts (calls, settings, distance of each call site from the running
    statistics) and the train/eval agreement: the numbers behind a clean report too."""
    layers = []
    for path, layer in probe.layers.items():
        calls = probe.calls_of(path)
        sites = []
        for call in calls:
            dist = _vs_running(call, layer) if _tracked(layer) else None
            sites.append({"site": call.site, "values_per_channel": call.values_per_channel,
                          **(dist.as_dict() if dist else {})})
        layers.append({"path": path, "kind": layer.kind,
                       "calls": len(calls) or probe.eval_calls.get(path, 0),
                       layer.rate_name: layer.rate, "eps": layer.eps,
                       "tracks_running_stats": layer.tracks_running_stats,
                       "at_init": layer.at_init, "sites": sites})
    result = {"layers": layers}
    div = divergence(probe)
    if div is not None:
        result["train_eval"] = div
    if probe.output_diff is not None:
        result["output_diff"] = probe.output_diff
    return result


def run_checks(probe: ProbeResult, source: str = "") -> Report:
    """All checks on one probe, as a report."""
    findings = [finding for check in CHECKS for finding in check(probe)]
    probe_info = {"input_shape": list(probe.input_shape), "source": source,
                  "samples": probe.input_shape[0] if probe.input_shape else None,
                  "train_steps": probe.train_log.steps if probe.train_log else 0}
    if probe.train_log is not None:
        probe_info["loss_first"] = probe.train_log.loss_first
        probe_info["loss_last"] = probe.train_log.loss_last
        probe_info["trained_where"] = probe.train_log.where
    notes = list(probe.notes)
    if not probe.layers:
        notes.append(
            "the model has no BatchNorm/InstanceNorm layers (LayerNorm and GroupNorm keep no "
            "running statistics, so there is nothing here for the doctor to check)"
        )
    return Report(
        findings=findings,
        model=probe.model_name,
        framework=probe.framework,
        probe=probe_info,
        summary=summary(probe),
        notes=notes,
    )
