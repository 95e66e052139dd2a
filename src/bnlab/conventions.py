"""Batch-normalization conventions of each framework, and converters between them.

bnlab states every running-average rate in PyTorch's convention: ``momentum`` is the
weight given to the NEW batch statistic (running = (1 - momentum) * running + momentum * batch).
Chainer's ``decay``, Keras/TF1's ``momentum`` and Flax's ``momentum`` weight the OLD value.

``CONVENTIONS`` holds, per framework, the facts a user needs when porting a model: the
name of the running-average parameter, which value it weights, its default, eps's default,
whether the running variance averages the biased or the unbiased batch variance, and the
switch that makes the layer use its running statistics. Each entry says where it was
checked. ``docs/conventions.md`` explains the formulas behind the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnlab.errors import UsageError

OLD, NEW = "old", "new"
BIASED, UNBIASED = "biased", "unbiased"


@dataclass(frozen=True)
class BNConvention:
    """One framework's batch-norm convention (the defaults of its standard BN layer)."""

    framework: str  # the key bnlab uses: chainer, torch, keras, tf1, flax
    name: str  # how people call it, with the version the facts were checked on
    layer: str  # the layer the facts are about
    parameter: str  # the running-average rate's argument name
    weights: str  # OLD: the parameter multiplies the old running value; NEW: the batch value
    default: float  # the parameter's default
    eps_default: float  # eps's default
    running_var: str  # which batch variance the running variance averages
    eval_switch: str  # what makes the layer normalize with its running statistics
    update: str  # the running-mean update, in the framework's own names
    checked_in: str  # where each fact above was read
    note: str = ""

    @property
    def cli_flag(self) -> str:
        """The ``bnlab convert`` flag that states this framework's parameter."""
        return f"--{self.parameter}"


CONVENTIONS: dict[str, BNConvention] = {
    c.framework: c
    for c in [
        BNConvention(
            framework="chainer",
            name="Chainer 7.8.1",
            layer="chainer.links.BatchNormalization",
            parameter="decay",
            weights=OLD,
            default=0.9,
            eps_default=2e-5,
            running_var=UNBIASED,
            eval_switch="with chainer.using_config('train', False)",
            update="avg_mean = decay * avg_mean + (1 - decay) * batch_mean",
            checked_in="chainer/links/normalization/batch_normalization.py and "
            "chainer/functions/normalization/batch_normalization.py (adjust = m / (m - 1)); "
            "one update step of the installed Chainer in tests/test_conventions_frameworks.py",
        ),
        BNConvention(
            framework="torch",
            name="PyTorch 2.x",
            layer="torch.nn.BatchNorm1d/2d/3d",
            parameter="momentum",
            weights=NEW,
            default=0.1,
            eps_default=1e-5,
            running_var=UNBIASED,
            eval_switch="model.eval()",
            update="running_mean = (1 - momentum) * running_mean + momentum * batch_mean",
            checked_in="torch.nn.modules.batchnorm docs; one update step of the installed torch in "
            "tests/test_conventions_frameworks.py",
            note="momentum=None switches to a cumulative (equal-weight) average",
        ),
        BNConvention(
            framework="keras",
            name="Keras 3",
            layer="keras.layers.BatchNormalization",
            parameter="momentum",
            weights=OLD,
            default=0.99,
            eps_default=1e-3,
            running_var=BIASED,
            eval_switch="layer(x, training=False) (the default outside fit(); trainable=False also forces it)",
            update="moving_mean = moving_mean * momentum + batch_mean * (1 - momentum)",
            checked_in="keras/src/layers/normalization/batch_normalization.py (ops.moments, no correction); "
            "one update step of the installed Keras 3 in tests/test_conventions_frameworks.py",
        ),
        BNConvention(
            framework="tf1",
            name="TensorFlow 1.x",
            layer="tf.layers.batch_normalization",
            parameter="momentum",
            weights=OLD,
            default=0.99,
            eps_default=1e-3,
            running_var=BIASED,
            eval_switch="training=False (default); when training, also run tf.GraphKeys.UPDATE_OPS",
            update="moving_mean -= (moving_mean - batch_mean) * (1 - momentum)",
            checked_in="tensorflow/python/layers/normalization.py and keras/layers/normalization.py (TF 1.x); "
            "one update step of tf.compat.v1.layers (TF 2.21 with tf_keras, 2-D and 4-D input) in "
            "tests/test_conventions_frameworks.py",
            note="biased for 2-D input (non-fused path, the question's case); the fused kernel used for "
            "4-D input stores the Bessel-corrected variance",
        ),
        BNConvention(
            framework="flax",
            name="Flax 0.12 (nnx, linen)",
            layer="flax.nnx.BatchNorm / flax.linen.BatchNorm",
            parameter="momentum",
            weights=OLD,
            default=0.99,
            eps_default=1e-5,
            running_var=BIASED,
            eval_switch="nnx: model.eval() (use_running_average=True); linen: use_running_average=True "
            "(training: False, with mutable=['batch_stats'])",
            update="mean = momentum * mean + (1 - momentum) * batch_mean",
            checked_in="flax/nnx/nn/normalization.py and flax/linen/normalization.py (_compute_stats: "
            "E[x^2] - E[x]^2); one update step of the installed nnx.BatchNorm and linen.BatchNorm in "
            "tests/test_conventions_frameworks.py",
        ),
    ]
}

FRAMEWORKS: tuple[str, ...] = tuple(CONVENTIONS)

# Frameworks whose running-average parameter weights the old running value.
_WEIGHTS_OLD = {k for k, c in CONVENTIONS.items() if c.weights == OLD}


def _check_framework(framework: str) -> None:
    if framework not in CONVENTIONS:
        known = ", ".join(sorted(CONVENTIONS))
        raise UsageError(f"unknown framework {framework!r}; known frameworks: {known}")


def _check_rate(value: float, framework: str) -> None:
    # A running-average weight outside [0, 1] extrapolates instead of averaging.
    if not 0.0 <= value <= 1.0:
        c = CONVENTIONS[framework]
        raise UsageError(f"{c.name}'s {c.parameter} is a running-average weight and must lie in [0, 1]; got {value}.")


def parameter_name(framework: str) -> str:
    """The name of ``framework``'s running-average rate (``decay`` for Chainer, else ``momentum``)."""
    _check_framework(framework)
    return CONVENTIONS[framework].parameter


def to_torch_momentum(framework: str, value: float) -> float:
    """PyTorch ``momentum`` equivalent to ``value`` stated in ``framework``'s convention."""
    _check_framework(framework)
    return 1.0 - value if framework in _WEIGHTS_OLD else value


def from_torch_momentum(framework: str, momentum: float) -> float:
    """``framework``'s running-average parameter equivalent to PyTorch ``momentum``."""
    _check_framework(framework)
    return 1.0 - momentum if framework in _WEIGHTS_OLD else momentum


def convert(value: float, from_framework: str, to_framework: str) -> float:
    """``value`` of ``from_framework``'s rate, stated as ``to_framework``'s rate.

    Frameworks on the same side (both weighting the old value, or both the new one)
    share the number; across sides it is ``1 - value``. The result is exact up to one
    float64 rounding; use :func:`format_rate` to print it.
    """
    _check_framework(from_framework)
    _check_framework(to_framework)
    _check_rate(value, from_framework)
    if (from_framework in _WEIGHTS_OLD) == (to_framework in _WEIGHTS_OLD):
        return float(value)
    return 1.0 - value


def format_rate(value: float) -> str:
    """A rate with enough digits to be exact for what people type, without float noise:
    ``0.010000000000000009`` (from ``1 - 0.99``) prints as ``0.01``."""
    text = f"{value:.12g}"
    return text if any(c in text for c in ".e") else f"{text}.0"


def format_conventions_table() -> str:
    """The conventions as an aligned plain-text table, followed by its footnotes."""
    header = [
        "framework",
        "layer",
        "rate",
        "weights",
        "default",
        "= torch momentum",
        "eps default",
        "running var",
        "eval switch",
    ]
    rows = [header]
    for c in CONVENTIONS.values():
        rows.append(
            [
                c.name,
                c.layer,
                c.parameter,
                f"{c.weights} value",
                format_rate(c.default),
                format_rate(to_torch_momentum(c.framework, c.default)),
                f"{c.eps_default:g}",
                c.running_var + ("*" if c.note and c.running_var == BIASED else ""),
                c.eval_switch,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for r in rows:
        # The last column is free text: left unpadded so the table does not grow trailing blanks.
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    lines.append("")
    lines.append("Running-mean update, in each framework's names (the variance is updated the same way):")
    for c in CONVENTIONS.values():
        lines.append(f"  {c.name}: {c.update}")
    lines.append("")
    for c in CONVENTIONS.values():
        if c.note:
            mark = "*" if c.running_var == BIASED else "-"
            lines.append(f"{mark} {c.name}: {c.note}.")
    lines.append("Normalization itself always divides by sqrt(biased batch variance + eps) while training.")
    lines.append("bnlab states rates as PyTorch momentum; convert with `bnlab convert`, see docs/conventions.md.")
    return "\n".join(lines)
