"""Backprop by hand: the same numbers as autograd for every model variant, and the loss."""

import pytest
import torch

from bnlab.engines.torch_step import check_supported, loss_and_gradients, softmax_cross_entropy
from bnlab.models import MLP, ModelConfig, batch_norms, build_model

VARIANTS = [
    ModelConfig(norm=norm, logits_norm=logits_norm, running_var=running_var, widths=widths)
    for norm in ("none", "per-layer", "shared")
    for logits_norm in (False, True)
    for running_var in ("unbiased", "biased")
    for widths in ((784, 40, 40, 10), (784, 24, 24, 24, 10))
] + [
    ModelConfig(widths=(784, 10)),
    ModelConfig(widths=(784, 10), logits_norm=True),
    ModelConfig(norm="shared", bn_momentum=0.01, bn_eps=1e-5, widths=(784, 100, 100, 10)),
]


def _minibatches(mnist, steps, rows=200):
    x = torch.tensor(mnist.train_images[: steps * rows].reshape(steps * rows, -1)).float().div_(255)
    y = torch.from_numpy(mnist.train_labels[: steps * rows].astype("int64"))
    return list(zip(x.split(rows), y.split(rows)))


def _autograd_step(model, x, y):
    for p in model.parameters():
        p.grad = None
    logits = model(x)
    loss = softmax_cross_entropy(logits, y)
    loss.backward()
    return loss.detach(), logits.detach()


@pytest.mark.parametrize(
    "cfg", VARIANTS, ids=lambda c: f"{c.norm}-logits{int(c.logits_norm)}-{c.running_var}-{len(c.widths)}"
)
def test_gradients_and_running_stats_equal_autograds_bit_for_bit(cfg, mnist):
    by_hand, reference = build_model(cfg, seed=1), build_model(cfg, seed=1)
    sgd = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (by_hand, reference)]
    for x, y in _minibatches(mnist, steps=4):
        loss, logits = loss_and_gradients(by_hand, x, y)
        ref_loss, ref_logits = _autograd_step(reference, x, y)
        assert torch.equal(loss, ref_loss) and torch.equal(logits, ref_logits)
        for (name, p), q in zip(by_hand.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), name
        for opt in sgd:  # move the weights so later steps test more than the initial point
            opt.step()
        for (name, a), b in zip(by_hand.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), name
    assert not loss.requires_grad and not logits.requires_grad


def test_observer_sees_every_bn_call_in_order_after_its_update(mnist):
    model = build_model(ModelConfig(norm="shared", logits_norm=True), seed=0)
    seen = []

    def observe(module, x):
        seen.append((module, x.shape, int(module.num_batches_tracked)))

    ((x, y),) = _minibatches(mnist, steps=1)
    loss_and_gradients(model, x, y, observe)
    assert [(m, s) for m, s, _ in seen] == [
        (model.bn, (200, 100)),
        (model.bn, (200, 100)),
        (model.bn_logits, (200, 10)),
    ]
    assert [n for _, _, n in seen] == [1, 2, 1]  # the running statistics are already updated
    assert set(batch_norms(model).values()) == {model.bn, model.bn_logits}


def test_models_it_cannot_train_are_refused_by_name():
    class Custom(MLP):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="Custom"):
        check_supported(Custom(ModelConfig()))
    odd = build_model(ModelConfig())
    odd.bn1.momentum = None  # cumulative averaging: not what this step implements
    with pytest.raises(ValueError, match="momentum"):
        check_supported(odd)
    check_supported(build_model(ModelConfig(norm="none")))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_softmax_cross_entropy_matches_pytorch_in_value_and_gradient(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    for rows, classes, scale, offset in [(1000, 10, 3.0, 0.0), (7, 3, 30.0, 1e4), (1, 10, 1.0, -50.0)]:
        logits = torch.randn(rows, classes, generator=gen, dtype=dtype) * scale + offset
        labels = torch.randint(0, classes, (rows,), generator=gen)
        ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss, ref_loss = softmax_cross_entropy(ours, labels), torch.nn.functional.cross_entropy(ref, labels)
        (loss * 3).backward()  # a non-unit upstream gradient must scale the result
        (ref_loss * 3).backward()
        assert loss.dtype == dtype and torch.isfinite(loss)
        torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
        torch.testing.assert_close(ours.grad, ref.grad, rtol=tol, atol=tol)


def test_softmax_cross_entropy_passes_gradcheck_and_propagates_nan():
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda z: softmax_cross_entropy(z, labels), (logits,))
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("nan")
    assert torch.isnan(softmax_cross_entropy(bad, torch.tensor([0, 1, 2])))


@pytest.mark.parametrize(
    "cfg",
    [ModelConfig(), ModelConfig(norm="shared"), ModelConfig(logits_norm=True, running_var="biased")],
    ids=["per-layer", "shared", "tf-logits-biased"],
)
def test_the_step_uses_only_device_generic_operations(cfg):
    """No GPU here: running the step on PyTorch's shape-only "meta" device at least shows it
    calls nothing CPU-specific and every gradient lands on the model's device, as on CUDA."""
    model = build_model(cfg, seed=0).to("meta")
    x = torch.empty(1000, 784, device="meta")
    labels = torch.empty(1000, dtype=torch.long, device="meta")
    loss, logits = loss_and_gradients(model, x, labels)
    assert loss.shape == () and logits.shape == (1000, 10)
    for p in model.parameters():
        assert p.grad.device.type == "meta" and p.grad.shape == p.shape
