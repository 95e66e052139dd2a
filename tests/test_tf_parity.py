"""The tensorflow engine (TF1 graph, real tf.layers) against the torch engine, on real MNIST.

Both engines start from the same torch-keyed initial weights and take the run's first 50
minibatches (batch 1000, ``np.array_split`` for the TF presets) in lockstep; per-step loss,
every parameter and every moving statistic are compared.

Float64: TF turns the Python floats it is given (Adam's lr, betas and eps, and the BN layer's
decay ``1 - momentum``) into float32 tensors, and a float64 graph casts those back, so TF
trains with float32's digits of 0.01, 0.9, 0.999, 1e-8 and 0.1. Its Adam also keeps the
bias-correction powers beta1^t, beta2^t in float32 variables, multiplied in float32 each
step. ``tf_faithful_torch`` reproduces all of that on the torch side (hyper-parameters
rounded to float32, and the float32 powers folded into a per-step learning rate of the
torch engine's own Adam), after which the two trajectories are the same computation up to
float64 rounding; the bounds below were measured on this machine (see the tests).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from bnlab.engines import tensorflow as tfe
from bnlab.experiments import PRESETS
from bnlab.models import build_model
from bnlab.train import RunConfig, epoch_orders, make_optimizer, split_batches, train_step

try:
    tf = tfe.import_tensorflow()  # sets TF_USE_LEGACY_KERAS=1 first, as the engine does
except tfe.TensorFlowMissing as err:
    pytest.skip(str(err), allow_module_level=True)

STEPS = 50
BATCH = 1000


@pytest.fixture(scope="module")
def arrays(mnist):
    from bnlab.data import to_float

    return to_float(mnist.train_images), np.asarray(mnist.train_labels)


def _replace(cfg: RunConfig, **changes) -> RunConfig:
    model = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(cfg.model)}}
    train = {k: v for k, v in changes.items() if k not in model}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                               train=dataclasses.replace(cfg.train, **train))


def tf_faithful_torch(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the float32 values TF actually uses for lr, betas, eps and the BN decay."""
    t = cfg.train
    decay = tfe.as_tf_float32(1.0 - tfe.tf_momentum(cfg.model))  # tf: convert_to_tensor(1.0 - momentum)
    return _replace(cfg, lr=tfe.as_tf_float32(t.lr), adam_beta1=tfe.as_tf_float32(t.adam_beta1),
                    adam_beta2=tfe.as_tf_float32(t.adam_beta2), adam_eps=tfe.as_tf_float32(t.adam_eps),
                    bn_momentum=decay)


def tf_beta_powers(beta: float, steps: int) -> list[float]:
    """TF1 Adam's beta^t accumulator at steps 1..steps: a float32 variable starting at beta,
    multiplied by float32(beta) after every step."""
    b = np.float32(beta)
    powers, power = [], b
    for _ in range(steps):
        powers.append(float(power))
        power = np.float32(power * b)
    return powers


def tf_power_lr(tc, step: int, b1_power: float, b2_power: float) -> float:
    """The torch Adam lr at ``step`` that gives TF's step with TF's float32 powers.

    TF: p -= lr sqrt(1 - B2) / (1 - B1) m / (sqrt(v) + eps). The torch engine (eps folded in,
    ``chainer_style_eps``): p -= lr' sqrt(bc2) / bc1 m / (sqrt(v) + eps), bc = 1 - beta^t exact.
    They agree for lr' = lr sqrt(1 - B2) / (1 - B1) * bc1 / sqrt(bc2)."""
    bc1, bc2 = 1.0 - tc.adam_beta1 ** step, 1.0 - tc.adam_beta2 ** step
    return tc.lr * math.sqrt(1.0 - b2_power) / (1.0 - b1_power) * bc1 / math.sqrt(bc2)


@dataclasses.dataclass
class Lockstep:
    tf_losses: list[float]
    torch_losses: list[float]
    tf_state: dict[str, torch.Tensor]
    torch_state: dict[str, torch.Tensor]
    tf_beta_powers: tuple[float, float]


def lockstep(cfg: RunConfig, arrays, steps: int = STEPS, *, dtype: type = np.float64, faithful: bool = True,
             torch_cfg: RunConfig | None = None, torch_model_hook=None) -> Lockstep:
    """Both engines in ``dtype`` from build_model(cfg, seed)'s weights over the run's first
    ``steps`` minibatches. ``faithful`` gives the torch side TF's float32 hyper-parameters and
    beta powers; ``torch_cfg`` / ``torch_model_hook`` alter only the torch side (the negative
    controls). Both run on one thread."""
    x, y = arrays
    tdtype = torch.from_numpy(np.zeros(0, dtype)).dtype
    initial = build_model(cfg.model, seed=cfg.train.seed).to(tdtype).state_dict()
    tcfg = torch_cfg or cfg
    if faithful:
        tcfg = tf_faithful_torch(tcfg)
    model = build_model(tcfg.model, seed=cfg.train.seed).to(tdtype)
    model.load_state_dict(initial)
    if torch_model_hook:
        torch_model_hook(model)
    tc = tcfg.train
    optimizer = make_optimizer(model, tc)
    program = tfe.build_program(cfg.model, dataclasses.replace(cfg.train, threads=1), dtype=dtype)
    try:
        tfe.load_torch_state(program, initial)
        order = next(epoch_orders(cfg.train.seed, len(x), 1))
        batches = split_batches(order, BATCH, cfg.train.batching)[:steps]
        b1s, b2s = tf_beta_powers(cfg.train.adam_beta1, steps), tf_beta_powers(cfg.train.adam_beta2, steps)
        tf_losses, torch_losses = [], []
        for step, idx in enumerate(batches, start=1):
            i = idx.numpy()
            xb, yb = x[i].astype(dtype), y[i].astype(np.int64)
            tf_loss, _ = tfe.train_step(program, xb, yb.astype(np.int32), cfg.train.train_metrics)
            if faithful:
                optimizer.param_groups[0]["lr"] = tf_power_lr(tc, step, b1s[step - 1], b2s[step - 1])
            t_loss, _ = train_step(model, optimizer, torch.from_numpy(xb), torch.from_numpy(yb), step, tc)
            tf_losses.append(tf_loss)
            torch_losses.append(float(t_loss))
        with program.graph.as_default():
            powers = program.session.run(list(_beta_accumulators(program)))
        return Lockstep(tf_losses, torch_losses, tfe.tf_state_dict(program), model.state_dict(),
                        (float(powers[0]), float(powers[1])))
    finally:
        program.close()


def _beta_accumulators(program):
    names = ("train/beta1_power:0", "train/beta2_power:0")
    found = {v.name: v for v in tf.compat.v1.global_variables() if v.name in names}
    return found[names[0]], found[names[1]]


def gaps(run: Lockstep) -> dict[str, tuple[float, str]]:
    """Worst relative gap of TF against torch: per-step loss (|a-b|/|b|), and per state tensor
    max |a-b| / max |b| (parameters and moving statistics separately)."""
    a, b = np.array(run.tf_losses), np.array(run.torch_losses)
    loss = np.abs(a - b) / np.abs(b)
    out = {"loss": (float(loss.max()), f"step {int(loss.argmax()) + 1}"), "parameters": (0.0, "-"),
           "moving stats": (0.0, "-")}
    for key, ref in run.torch_state.items():
        if not ref.is_floating_point():
            continue
        gap = float((run.tf_state[key].double() - ref.double()).abs().max() / ref.double().abs().max())
        kind = "moving stats" if key.endswith(("running_mean", "running_var")) else "parameters"
        out[kind] = max(out[kind], (gap, key))
    return out
