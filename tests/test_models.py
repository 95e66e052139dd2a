"""The question's MLP: placements, parameter counts, initializers, TF-style running variance."""

import math

import pytest
import torch
from torch import nn

from bnlab.models import BiasedVarBatchNorm1d, ModelConfig, batch_norms, build_model

LINEAR_PARAMS = (784 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10)  # 89,610


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "norm, logits_norm, extra",
    [
        ("none", False, 0),
        ("per-layer", False, 2 * 200),  # gamma and beta of bn1 and bn2
        ("shared", False, 200),  # ONE module: one gamma and beta
        ("per-layer", True, 2 * 200 + 20),
    ],
)
def test_parameter_counts(norm, logits_norm, extra):
    model = build_model(ModelConfig(norm=norm, logits_norm=logits_norm))
    assert n_params(model) == LINEAR_PARAMS + extra


def test_shared_placement_is_one_module_called_after_every_hidden_layer():
    model = build_model(ModelConfig(norm="shared"), seed=0)
    assert list(batch_norms(model)) == ["bn"]
    calls = []
    model.bn.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    model(torch.randn(8, 784))
    assert len(calls) == 2  # after l1 and after l2, the question's bug
    assert "bn.running_mean" in model.state_dict() and "bn1.running_mean" not in model.state_dict()


def test_per_layer_placement_has_one_bn_per_hidden_layer():
    model = build_model(ModelConfig(norm="per-layer", widths=(784, 50, 40, 30, 10)))
    assert list(batch_norms(model)) == ["bn1", "bn2", "bn3"]
    assert [m.num_features for m in batch_norms(model).values()] == [50, 40, 30]
    assert model(torch.randn(4, 784)).shape == (4, 10)


def test_shared_needs_equal_hidden_widths():
    with pytest.raises(ValueError, match="hidden widths must be equal"):
        ModelConfig(norm="shared", widths=(784, 100, 50, 10))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"norm": "batch"}, "norm must be one of"),
        ({"init": "he"}, "init must be one of"),
        ({"bn_momentum": 0.9 + 1}, "bn_momentum"),
        ({"bn_eps": 0.0}, "bn_eps"),
        ({"widths": (784,)}, "widths"),
    ],
)
def test_bad_model_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_chainer_he_normal_matches_chainers_definition():
    # Chainer's HeNormal(scale=1, fan_option='fan_in') is Normal(0, sqrt(2 / fan_in)); bias 0.
    model = build_model(ModelConfig(widths=(784, 1000, 1000, 10), init="chainer-he-normal"), seed=0)
    for linear, fan_in in ((model.l1, 784), (model.l2, 1000)):
        assert linear.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
        assert linear.weight.mean().item() == pytest.approx(0.0, abs=0.002)
        assert torch.count_nonzero(linear.bias) == 0


def test_tf_glorot_uniform_matches_tf1_dense_defaults():
    model = build_model(ModelConfig(init="tf-glorot-uniform"), seed=0)
    limit = math.sqrt(6 / (784 + 100))
    w = model.l1.weight
    assert w.abs().max().item() <= limit
    assert w.abs().max().item() > 0.99 * limit  # actually uniform over the full range
    assert w.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.02)
    assert torch.count_nonzero(model.l1.bias) == 0


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(ModelConfig(), seed=5)
    after = torch.rand(1)
    b = build_model(ModelConfig(), seed=5)
    assert torch.equal(before, after)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    c = build_model(ModelConfig(), seed=6)
    assert not torch.equal(a.l1.weight, c.l1.weight)


def test_biased_var_batchnorm_normalizes_like_pytorch_but_stores_biased_variance():
    torch.manual_seed(0)
    x = torch.randn(16, 5) * 3 + 1
    ours = BiasedVarBatchNorm1d(5, eps=1e-3, momentum=0.1)
    ref = nn.BatchNorm1d(5, eps=1e-3, momentum=0.1)
    with torch.no_grad():
        ours.weight.uniform_()
        ours.bias.uniform_()
        ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x))
    biased = x.var(0, unbiased=False)
    torch.testing.assert_close(ours.running_var, 0.9 * torch.ones(5) + 0.1 * biased)
    torch.testing.assert_close(ref.running_var, 0.9 * torch.ones(5) + 0.1 * x.var(0, unbiased=True))
    torch.testing.assert_close(ours.running_mean, 0.1 * x.mean(0))
    assert ours.num_batches_tracked.item() == 1
    ours.eval(), ref.eval()
    ref.running_var.copy_(ours.running_var)
    torch.testing.assert_close(ours(x), ref(x))
