"""The torch engine's training step: forward, loss and backward written out by hand,
PyTorch's fused Adam kernel, and the Chainer/TF1 placement of Adam's eps.

Why by hand: at the question's sizes (1000 rows, 784 -> 100 -> 100 -> 10) every kernel of a
step is small, and autograd's bookkeeping around them (recording the graph, then walking
it) cost about 0.5 ms a step on the CPU this was written on, which is 5-10% of an epoch,
and it is most of a step's time on a GPU. Written out, a step runs only the kernels:
the same PyTorch kernels autograd runs for Linear, BatchNorm and ReLU (``addmm``, ``mm``,
``native_batch_norm`` and its backward, ``threshold_backward``), so on the CPU the
gradients and running statistics are those of ``loss.backward()`` bit for bit
(``tests/test_backprop.py`` checks every model variant against autograd).

Read it as Chainer's or numpy's backprop: the forward keeps what the backward needs, the
backward walks the layers in reverse. The loss is the mean softmax cross-entropy, whose
gradient ``(softmax - onehot) / n`` falls out of the forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from bnlab.config import TrainConfig
from bnlab.models import MLP, BiasedVarBatchNorm1d

aten = torch.ops.aten

# Called after every training-mode BN call with the module and the input it normalized.
NormObserver = Callable[[nn.BatchNorm1d, torch.Tensor], None]


# ---------------------------------------------------------------------------------- loss


def cross_entropy_and_grad(
    logits: torch.Tensor, labels: torch.Tensor, with_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of ``logits`` (n, classes) against integer ``labels`` (n,), and,
    with ``with_grad``, its gradient with respect to the logits.

    ``F.cross_entropy`` runs log_softmax and nll_loss forward and backward; PyTorch's CPU
    log_softmax is slow on rows of 10 classes, and this takes about a third of the time
    (0.1 vs 0.29 ms a step here), as Chainer's ``softmax_cross_entropy`` does. It agrees
    with ``F.cross_entropy`` to float rounding.
    """
    row_max = logits.amax(1, keepdim=True)
    shifted = logits - row_max  # exp() of it cannot overflow
    exp = shifted.exp()
    row_sum = exp.sum(1, keepdim=True)
    picked = shifted.gather(1, labels[:, None])
    loss = (row_sum.log() - picked).mean()
    if not with_grad:
        return loss, None
    grad = exp.div_(row_sum)
    grad.scatter_add_(1, labels[:, None], torch.full_like(picked, -1.0))
    return loss, grad.div_(len(labels))


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, grad = cross_entropy_and_grad(logits, labels, with_grad=ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``cross_entropy_and_grad``'s loss as an autograd function: a drop-in for
    ``F.cross_entropy`` (mean, integer labels) that gives bnlab's numbers exactly."""
    return _SoftmaxCrossEntropy.apply(logits, labels)


# ------------------------------------------------------------------------------ the step


@dataclass
class _Hidden:
    """What the backward needs from one hidden layer."""

    linear: nn.Linear
    norm: nn.BatchNorm1d | None
    inputs: torch.Tensor  # what the Linear read
    pre_norm: torch.Tensor  # the Linear's output
    saved: tuple[torch.Tensor, torch.Tensor] | None  # BN's batch mean and 1/std
    activation: torch.Tensor  # the ReLU's output


def check_supported(model: nn.Module) -> None:
    """Raise ValueError unless ``model`` is a plain bnlab MLP that this step can train."""
    if type(model) is not MLP:
        raise ValueError(f"backprop by hand trains bnlab's MLP only, not {type(model).__name__}")
    for norm in [*model._norms, getattr(model, "bn_logits", None)]:
        if norm is not None and not (norm.affine and norm.track_running_stats and isinstance(norm.momentum, float)):
            raise ValueError("backprop by hand needs affine BatchNorm with running statistics and a numeric momentum")


@torch.no_grad()
def loss_and_gradients(
    model: MLP, x: torch.Tensor, labels: torch.Tensor, observe: NormObserver | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training-mode forward and backward of ``model`` on a minibatch.

    Sets every parameter's ``.grad`` to its gradient of the mean cross-entropy (replacing
    what was there, as ``loss.backward()`` after ``zero_grad()`` would), updates the BN
    running statistics as the forward does, and returns the (loss, logits). Module hooks
    are not called; ``observe`` sees every BN call instead.
    """
    hidden: list[_Hidden] = []
    h = x
    for linear, norm in zip(model._linears[:-1], model._norms, strict=False):
        z = aten.addmm(linear.bias, h, linear.weight.t())  # what F.linear runs
        out, saved = _norm_forward(norm, z, observe) if norm is not None else (z, None)
        activation = aten.relu(out)
        hidden.append(_Hidden(linear, norm, h, z, saved, activation))
        h = activation
    last = model._linears[-1]
    logits = aten.addmm(last.bias, h, last.weight.t())
    bn_logits = cast(nn.BatchNorm1d, model.bn_logits) if model.cfg.logits_norm else None
    out, saved = _norm_forward(bn_logits, logits, observe) if bn_logits is not None else (logits, None)

    loss, grad_out = cross_entropy_and_grad(out, labels)
    assert grad_out is not None
    grad = grad_out
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if bn_logits is not None:
        assert saved is not None
        grad = _norm_backward(bn_logits, grad, logits, saved, grads)
    grad_in = _linear_backward(last, h, grad, grads, input_grad=bool(hidden))
    for i, layer in enumerate(reversed(hidden)):
        assert grad_in is not None  # every layer but the first passes a gradient down
        grad = aten.threshold_backward(grad_in, layer.activation, 0)  # ReLU's backward
        if layer.norm is not None:
            assert layer.saved is not None
            grad = _norm_backward(layer.norm, grad, layer.pre_norm, layer.saved, grads)
        grad_in = _linear_backward(layer.linear, layer.inputs, grad, grads, input_grad=i < len(hidden) - 1)
    for param, g in grads.items():
        param.grad = g
    return loss, out


def _norm_forward(
    norm: nn.BatchNorm1d, z: torch.Tensor, observe: NormObserver | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """BatchNorm's training forward as the module runs it, keeping the kernel's saved
    batch mean and 1/std for the backward."""
    if isinstance(norm, BiasedVarBatchNorm1d):
        norm.update_running_stats(z)
        out, mean, invstd = aten.native_batch_norm(z, norm.weight, norm.bias, None, None, True, 0.0, norm.eps)
    else:
        assert norm.num_batches_tracked is not None
        norm.num_batches_tracked.add_(1)
        out, mean, invstd = aten.native_batch_norm(
            z, norm.weight, norm.bias, norm.running_mean, norm.running_var, True, norm.momentum, norm.eps
        )
    if observe is not None:
        observe(norm, z)
    return out, (mean, invstd)


def _norm_backward(
    norm: nn.BatchNorm1d, grad: torch.Tensor, z: torch.Tensor, saved: tuple[torch.Tensor, torch.Tensor], grads: dict
) -> torch.Tensor:
    mean, invstd = saved
    grad_z, grad_weight, grad_bias = aten.native_batch_norm_backward(
        grad, z, norm.weight, None, None, mean, invstd, True, norm.eps, [True, True, True]
    )
    _accumulate(grads, norm.weight, grad_weight)  # a shared BN is called, and gets a gradient, per site
    _accumulate(grads, norm.bias, grad_bias)
    return grad_z


def _linear_backward(
    linear: nn.Linear, inputs: torch.Tensor, grad: torch.Tensor, grads: dict, input_grad: bool
) -> torch.Tensor | None:
    # The products autograd runs for addmm(bias, inputs, weight.t()), in the same layouts.
    _accumulate(grads, linear.weight, grad.t().mm(inputs))
    _accumulate(grads, linear.bias, grad.sum(0))
    return grad.mm(linear.weight) if input_grad else None


def _accumulate(grads: dict, param: torch.Tensor, grad: torch.Tensor) -> None:
    grads[param] = grads[param] + grad if param in grads else grad


# --------------------------------------------------------------------------------- Adam


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused Adam runs one kernel for all parameters on CPU and CUDA alike.
    return torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=True
    )


def _can_call_fused_kernel(optimizer: torch.optim.Optimizer) -> bool:
    if not (
        isinstance(optimizer, torch.optim.Adam) and hasattr(torch, "_fused_adam_") and len(optimizer.param_groups) == 1
    ):
        return False
    group = optimizer.param_groups[0]
    plain = group.get("fused") and not (group["amsgrad"] or group["maximize"] or group.get("differentiable"))
    return (
        bool(plain)
        and isinstance(group["lr"], float)
        and all(p.grad is not None and not p.grad.is_sparse for p in group["params"])
    )


def adam_step(optimizer: torch.optim.Optimizer, eps: float) -> None:
    """One step of ``torch.optim.Adam(fused=True)`` with this step's ``eps``.

    It calls the very kernel ``optimizer.step()`` calls, on the optimizer's own state, so
    the arithmetic (and every history) is bit-identical; what it skips is
    ``Optimizer.step``'s per-call Python bookkeeping, measured at about 0.8 ms a step here,
    8% of an epoch. Anything unusual (another optimizer, several groups, a missing
    gradient, a torch without the kernel) takes the ordinary ``optimizer.step()``.
    """
    group = optimizer.param_groups[0]
    group["eps"] = eps
    if not _can_call_fused_kernel(optimizer):
        optimizer.step()
        return
    params = group["params"]
    states = [optimizer.state[p] for p in params]
    for p, state in zip(params, states):
        if not state:  # the same initial state torch.optim.Adam creates for fused=True
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    torch._fused_adam_(
        params,
        [p.grad for p in params],
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        steps,
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        weight_decay=group["weight_decay"],
        eps=eps,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        found_inf=None,
    )


def chainer_style_eps(eps: float, beta2: float, step: int) -> float:
    """The torch.optim.Adam eps that reproduces Chainer/TF1's Adam at ``step`` (1-based).

    Chainer: p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps).
    PyTorch: p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps').
    They agree exactly when eps' = eps / sqrt(1 - b2^t).
    """
    return eps / math.sqrt(1.0 - beta2**step)


# ------------------------------------------------------------------------ the whole step


def train_step(
    model: MLP,
    optimizer: torch.optim.Optimizer,
    xb: torch.Tensor,
    yb: torch.Tensor,
    step: int,
    tc: TrainConfig,
    observe: NormObserver | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam step on one minibatch (``step`` is 1-based); returns the (loss, logits)
    that the epoch's train/loss and train/acc average, as detached device tensors.

    The gradients come from ``bnlab.backprop`` (the backward written out, the same
    numbers as autograd's), ``observe`` sees every BN call."""
    loss, logits = loss_and_gradients(model, xb, yb, observe)
    eps = chainer_style_eps(tc.adam_eps, tc.adam_beta2, step) if tc.adam_eps_mode == "chainer" else tc.adam_eps
    adam_step(optimizer, eps)
    if tc.train_metrics == "eval-after-step":
        return eval_forward(model, xb, yb)
    return loss, logits


# On the CPU the 10,000-row evaluation runs about 20% faster as ten 1,000-row products
# (their operands stay in cache), and each row of the logits is the same bit for bit.
CPU_EVAL_ROWS = 1000


def eval_forward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode (running statistics) loss and logits; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        rows = CPU_EVAL_ROWS if x.device.type == "cpu" else len(x)
        logits = torch.cat([model(chunk) for chunk in x.split(rows)])
        loss, _ = cross_entropy_and_grad(logits, y, with_grad=False)
    model.train(was_training)
    return loss, logits


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode (running statistics) loss and accuracy over the whole set, as device tensors."""
    loss, logits = eval_forward(model, x, y)
    with torch.inference_mode():
        acc = (logits.argmax(1) == y).float().mean()
    return loss, acc
