"""Grouped-GEMM gpt-oss experts (model/grouped_experts.py) against a per-expert loop, on the CPU: outputs and the
gradients of the input, every weight, every bias and the routing probabilities, with an expert that gets no
token and activations beyond the clamp limit."""

import torch

from gptoss_nemo.model.grouped_experts import gpt_oss_activation, grouped_expert_mlp


def _loop(x, counts, probs, w1, b1, w2, b2, limit):
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start:start + n]
        h = gpt_oss_activation(xe @ w1[e].t() + b1[e], limit)
        outs.append((h @ w2[e].t() + b2[e]) * probs[start:start + n, None])
        start += n
    return torch.cat(outs)


def test_grouped_matches_the_per_expert_loop():
    g = torch.Generator().manual_seed(0)
    e, h, i, limit = 4, 16, 8, 7.0
    counts = torch.tensor([5, 0, 3, 9])
    t = int(counts.sum())
    leaves = [torch.randn(t, h, generator=g) * 3,  # large enough that some gates / ups pass the clamp
              torch.rand(t, generator=g),
              torch.randn(e, 2 * i, h, generator=g), torch.randn(e, 2 * i, generator=g),
              torch.randn(e, h, i, generator=g) * 0.1, torch.randn(e, h, generator=g)]
    ours = [p.clone().requires_grad_() for p in leaves]
    ref = [p.clone().requires_grad_() for p in leaves]
    x, probs, w1, b1, w2, b2 = ours
    y = grouped_expert_mlp(x, counts, probs, w1, b1, w2, b2, limit)
    y_ref = _loop(ref[0], counts, ref[1], *ref[2:], limit)
    assert y.shape == (t, h)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    clamped = (x.detach() @ w1[0].detach().t() + b1[0].detach()).abs() > limit
    assert clamped.any(), "the test should exercise the clamp"
    grad = torch.randn(t, h, generator=g)
    y.backward(grad)
    y_ref.backward(grad)
    for name, a, b in zip(["x", "probs", "fc1_w", "fc1_b", "fc2_w", "fc2_b"], ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert w1.grad[1].abs().sum() == 0 and b2.grad[1].abs().sum() == 0  # the expert with no token


def test_mismatched_expert_count_is_refused():
    import pytest

    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="3 experts' weights for 2 token counts"):
        grouped_expert_mlp(x, torch.tensor([1, 1]), torch.ones(2), torch.zeros(3, 8, 8), torch.zeros(3, 8),
                           torch.zeros(3, 8, 4), torch.zeros(3, 8))
