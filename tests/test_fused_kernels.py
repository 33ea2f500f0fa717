"""The fused local kernels (train.kernels=fused) on the CPU: flex attention with sinks against a dense softmax with
the sink in the denominator (window, documents, grouped-query heads), the document ids from position ids, the
grouped-GEMM experts module against megatron's SequentialMLP (outputs, gradients, parameter names), and the spec and
recipe switches. The GPU tier (tests/gpu/test_fused_kernels_gpu.py) checks gradients of the compiled attention and
whole models."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attention_reference import dense_sink_attention

from gptoss_nemo.model.flex_attention import document_ids, sink_attention


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("packed", [False, True])
def test_sink_attention_matches_the_dense_definition(window, packed):
    g = torch.Generator().manual_seed(0)
    b, heads, groups, s, d = 2, 4, 2, 48, 16
    q, k, v = (torch.randn(b, n, s, d, generator=g) for n in (heads, groups, groups))
    sinks = torch.randn(heads, generator=g)
    pos = torch.cat([torch.arange(20), torch.arange(28)]).expand(b, s).clone()
    pos[1] = torch.arange(s)  # the second sequence is one document
    docs = document_ids(pos) if packed else None
    out = sink_attention(q, k, v, sinks, 0.25, window, docs)
    ref = dense_sink_attention(q, k, v, sinks, 0.25, window, docs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if packed:  # the first query of the second document sees only itself: no leak from the first document
        alone = dense_sink_attention(q[:1, :, 20:], k[:1, :, 20:], v[:1, :, 20:], sinks, 0.25, window)
        torch.testing.assert_close(out[:1, :, 20:], alone, rtol=1e-5, atol=1e-5)


def test_document_ids_restart_with_every_position_zero():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]])
    ids = document_ids(pos)
    assert ids.tolist() == [[1, 1, 1, 2, 2, 3, 4], [1] * 7] and ids.dtype == torch.int32
    with pytest.raises(ValueError, match="batch, seq"):
        document_ids(torch.zeros(3))


def test_document_block_masks_are_shared_by_aliases_and_never_by_other_ids():
    """A detached alias of the same ids (what megatron's recompute hands the attention in the backward) finds the
    block mask built in the forward; other ids, or the same storage written in place, get their own."""
    from gptoss_nemo.errors import ConfigError
    from gptoss_nemo.model.flex_attention import _document_block_mask

    ids = document_ids(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))
    mask = _document_block_mask(ids, None, 8, 8)
    assert _document_block_mask(ids.detach(), None, 8, 8) is mask
    assert _document_block_mask(ids, 3, 8, 8) is not mask
    other = document_ids(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]]))
    assert _document_block_mask(other, None, 8, 8) is not mask
    ids[0, :] = 1
    assert _document_block_mask(ids, None, 8, 8) is not mask
    with pytest.raises(ConfigError, match="integer document ids"):
        _document_block_mask(torch.ones(1, 8, dtype=torch.bool), None, 8, 8)


SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    ps.initialize_model_parallel(1, 1)
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_config import TransformerConfig
    from gptoss_nemo.compat import apply_megatron_patches
    from gptoss_nemo.model.grouped_experts import GroupedGemmExperts
    apply_megatron_patches()
    torch.manual_seed(0)  # the weights below come from torch's global generator: one fixed draw, not a new one per run
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=1, ffn_hidden_size=24,
        num_moe_experts=4, moe_ffn_hidden_size=24, gated_linear_unit=True, activation_func=quick_gelu,
        glu_linear_offset=1.0, activation_func_clamp_value=7.0, add_bias_linear=True, bias_activation_fusion=False,
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0)
    subs = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    ref = SequentialMLP(4, cfg, subs, pg_collection=pgs)
    fused = GroupedGemmExperts(4, cfg, subs, pg_collection=pgs)
    assert list(ref.state_dict()) == list(fused.state_dict()), "parameter names must be SequentialMLP's"
    fused.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in ref.parameters():  # biases too, so that a wrong bias path shows
            p.normal_(0, 0.5)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 3, 9])
    x = torch.randn(17, 32, generator=g) * 3
    probs = torch.rand(17, generator=g)
    outs, grads = [], []
    for m in (ref, fused):
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        y, bias = m(xi, counts, pi)
        assert bias is None
        (y * torch.arange(32.0)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad, pi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    from gptoss_nemo.model.grouped_experts import expert_weight_cache
    fused.zero_grad()
    with expert_weight_cache(fused):
        for _ in range(2):  # two micro-batches of one global batch
            y, _ = fused(x.clone(), counts, probs.clone())
            torch.testing.assert_close(y.detach(), outs[0], rtol=1e-5, atol=1e-5)
            (y * torch.arange(32.0)).sum().backward()
        cached = fused._cache["linear_fc1"]
    assert fused._cache is None and cached.shape == (4, 48, 32)
    for p, g in zip(fused.parameters(), grads[1][2:]):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-4, atol=1e-4)
    import dataclasses
    from gptoss_nemo.errors import ConfigError
    try:
        GroupedGemmExperts(4, dataclasses.replace(cfg, glu_linear_offset=0.0), subs, pg_collection=pgs)
        raise SystemExit("another activation must be refused")
    except ConfigError as e:
        assert "model.impl=reference" in str(e)
    print("experts ok", float(outs[0].abs().max()))
""")


def test_grouped_gemm_experts_match_megatrons_sequential_mlp():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, "29631"], capture_output=True, text=True, env=env, timeout=300)
    assert "experts ok" in r.stdout, r.stderr[-3000:]


def test_fused_spec_swaps_attention_and_experts_only():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.moe.experts import SequentialMLP

    from gptoss_nemo.model.build import layer_spec
    from gptoss_nemo.model.flex_attention import FlexSinkAttention
    from gptoss_nemo.model.grouped_experts import GroupedGemmExperts
    from gptoss_nemo.model.megatron_config import to_transformer_config
    from gptoss_nemo.model.presets import tiny

    specs = {k: layer_spec(to_transformer_config(tiny(), impl=k)) for k in ("reference", "fused")}
    attn = {k: s.submodules.self_attention.submodules.core_attention for k, s in specs.items()}
    experts = {k: s.submodules.mlp.keywords["submodules"].experts for k, s in specs.items()}
    assert attn == {"reference": DotProductAttention, "fused": FlexSinkAttention}
    assert experts["reference"].func is SequentialMLP and experts["fused"].func is GroupedGemmExperts
    assert experts["fused"].keywords == experts["reference"].keywords  # the same linear submodules
    assert issubclass(FlexSinkAttention, DotProductAttention)  # same parameter and checkpoint keys
    assert issubclass(GroupedGemmExperts, SequentialMLP)


def test_unknown_implementations_are_refused():
    from gptoss_nemo.config.sft import ModelConfig
    from gptoss_nemo.errors import ConfigError
    from gptoss_nemo.model.megatron_config import to_transformer_config
    from gptoss_nemo.model.presets import tiny

    with pytest.raises(ConfigError, match="model.impl='flash'; use one of auto, fused, te, reference"):
        ModelConfig(impl="flash")
    with pytest.raises(ConfigError, match="impl='local'"):
        to_transformer_config(tiny(), impl="local")


def test_training_step_hands_each_implementation_its_documents():
    """fused: document ids; te: the micro-batch as one THD sequence with a segment per document (padding one
    segment per sequence, every sequence start a boundary); reference: nothing (causal)."""
    from gptoss_nemo.train.step import document_segments, model_inputs

    pos = torch.tensor([[0, 1, 0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 0, 1, 2, 3, 0]])
    batch = {"tokens": torch.arange(24).view(3, 8), "position_ids": pos}
    assert document_segments(pos).tolist() == [0, 2, 5, 8, 16, 19, 23, 24]
    assert document_segments(pos).dtype == torch.int32
    same, docs = model_inputs("reference", batch, "cpu")
    assert torch.equal(same["tokens"], batch["tokens"]) and docs == {"attention_mask": None}
    _, docs = model_inputs("fused", batch, "cpu")
    assert docs["attention_mask"].tolist()[0] == [1, 1, 2, 2, 2, 3, 4, 5]
    same, docs = model_inputs("te", batch, "cpu")  # unpacked data: TE's attention takes the sequences as they are
    assert same["tokens"].shape == (3, 8) and docs == {"attention_mask": None}
    flat, docs = model_inputs("te", batch, "cpu", thd=True)
    packed = docs["packed_seq_params"]
    assert flat["tokens"].shape == flat["position_ids"].shape == (1, 24) and docs["attention_mask"] is None
    assert packed.qkv_format == "thd" and packed.max_seqlen_q == packed.max_seqlen_kv == 8
    assert packed.cu_seqlens_q.tolist() == [0, 2, 5, 8, 16, 19, 23, 24]


def test_bf16_cross_entropy_matches_torch_in_fp32():
    from gptoss_nemo.model.cross_entropy import language_model_loss

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 2, 50, generator=g) * 4).to(torch.bfloat16)  # [s, b, V]
    labels = torch.randint(0, 50, (2, 6), generator=g)  # [b, s]
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().float().requires_grad_()
    loss = language_model_loss(labels, ours_in)
    ref = torch.nn.functional.cross_entropy(ref_in.permute(1, 2, 0), labels, reduction="none")  # [b, s]
    assert loss.shape == (2, 6) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    w = torch.rand(2, 6, generator=g)
    (loss * w).sum().backward()
    (ref * w).sum().backward()
    assert ours_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad, rtol=1e-2, atol=1e-3)


def test_weight_cache_only_where_the_quantizer_passes_gradients_through():
    from types import SimpleNamespace

    from gptoss_nemo.model.grouped_experts import straight_through

    def quantizer(params=(), **flags):
        return SimpleNamespace(parameters=lambda: iter(params), **flags)

    assert straight_through(None)
    assert straight_through(quantizer(_pass_through_bwd=True))
    assert not straight_through(quantizer(_pass_through_bwd=False))  # STE with clipping: needs its own backward
    assert not straight_through(quantizer(_pass_through_bwd=True, _lsq=True))  # learned scales
    assert not straight_through(quantizer([torch.nn.Parameter(torch.ones(1))], _pass_through_bwd=True))
    assert not straight_through(quantizer())  # e.g. a chain of quantizers, which has no such flag
