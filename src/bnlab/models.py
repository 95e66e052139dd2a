"""The question's MLP in PyTorch, with the normalization placements its programs use.

Module names follow the question's Chainer program (``l1``, ``l2``, ``l3``, ``bn1``, ``bn2``
or the single shared ``bn``), so state_dict keys read like the code in the question.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.config import ModelConfig

__all__ = ["MLP", "BiasedVarBatchNorm1d", "ModelConfig", "batch_norms", "build_model", "init_weights"]


class BiasedVarBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose running variance averages the BIASED batch variance.

    That is what TF1's non-fused ``tf.layers.batch_normalization`` (used for 2-D dense
    inputs) and Keras 3 store; PyTorch and Chainer store the unbiased (n/(n-1)) one.
    Normalization itself uses the biased variance in every framework.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self.update_running_stats(x)
        # Normalization uses the biased batch variance, as in every framework, with
        # PyTorch's own kernel (running statistics None: they are kept above instead).
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)

    @torch.no_grad()
    def update_running_stats(self, x: torch.Tensor) -> None:
        """Move the running averages towards the batch mean and BIASED batch variance."""
        var, mean = torch.var_mean(x, dim=0, correction=0)
        running_mean, running_var, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        assert running_mean is not None and running_var is not None and tracked is not None
        assert self.momentum is not None  # bnlab always sets an exponential rate
        running_mean.lerp_(mean, self.momentum)
        running_var.lerp_(var, self.momentum)
        tracked.add_(1)


def _make_bn(width: int, cfg: ModelConfig) -> nn.BatchNorm1d:
    cls = BiasedVarBatchNorm1d if cfg.running_var == "biased" else nn.BatchNorm1d
    return cls(width, eps=cfg.bn_eps, momentum=cfg.bn_momentum)


class MLP(nn.Module):
    """Linear -> [BN] -> ReLU for each hidden layer, then a Linear (optionally BN) for logits.

    ``norm="shared"`` registers ONE BatchNorm module named ``bn`` and calls it after every
    hidden layer: the question's bug, reproduced faithfully rather than simulated.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths
        self.n_layers = len(widths) - 1
        for i in range(self.n_layers):
            self.add_module(f"l{i + 1}", nn.Linear(widths[i], widths[i + 1]))
        if cfg.norm == "per-layer":
            for i in range(1, self.n_layers):
                self.add_module(f"bn{i}", _make_bn(widths[i], cfg))
        elif cfg.norm == "shared" and self.n_layers > 1:
            self.bn = _make_bn(widths[1], cfg)
        if cfg.logits_norm:
            self.bn_logits = _make_bn(widths[-1], cfg)
        # Resolved once so forward() does no string lookups per call.
        self._linears: list[nn.Linear] = [getattr(self, f"l{i + 1}") for i in range(self.n_layers)]
        self._norms = [self._hidden_norm(i) for i in range(1, self.n_layers)]
        init_weights(self, cfg.init)

    def _hidden_norm(self, i: int) -> nn.BatchNorm1d | None:
        if self.cfg.norm == "per-layer":
            return cast(nn.BatchNorm1d, getattr(self, f"bn{i}"))
        if self.cfg.norm == "shared":
            return cast(nn.BatchNorm1d, self.bn)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for linear, norm in zip(self._linears[:-1], self._norms):
            h = linear(h)
            if norm is not None:
                h = norm(h)
            h = F.relu(h)
        logits = self._linears[-1](h)
        if self.cfg.logits_norm:
            logits = self.bn_logits(logits)
        return logits


def init_weights(model: MLP, init: str) -> None:
    """Initialize Linear layers the way the original program's framework does.

    - chainer-he-normal: Chainer's ``HeNormal()`` = Normal(0, sqrt(2 / fan_in)), bias 0.
    - tf-glorot-uniform: TF1 ``tf.layers.dense`` defaults: U(+-sqrt(6 / (fan_in + fan_out))), bias 0.
    - torch-default: whatever ``nn.Linear`` did at construction.
    """
    if init == "torch-default":
        return
    with torch.no_grad():
        for linear in model._linears:
            fan_out, fan_in = linear.weight.shape
            if init == "chainer-he-normal":
                linear.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
            else:
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                linear.weight.uniform_(-limit, limit)
            linear.bias.zero_()


def build_model(cfg: ModelConfig, seed: int | None = None) -> MLP:
    """Build the MLP on the CPU; with ``seed`` its initial weights are reproducible."""
    if seed is None:
        return MLP(cfg)
    # A private generator state keeps the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(cfg)


def batch_norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm modules by dotted name (a shared module appears once)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
