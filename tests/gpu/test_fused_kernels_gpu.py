"""GPU tier for the fused local kernels (model.impl=fused; issue 8): flex attention with sinks and grouped-GEMM
experts against megatron's reference modules and against the float64 definition, forward and gradients, in BF16;
and under ModelOpt MXFP4 QAT (every expert weight goes through its quantizer).

The BF16 criterion: against the float64 truth, the fused module's relative error (||a - truth|| / ||truth||) is at
most twice the reference module's plus 1e-3, for the output and every gradient. Prints `RESULT ...` lines."""

import pytest
import torch
from attention_reference import dense_sink_attention
from parity import relative_difference as rel

from gptoss_nemo.model.build import build_model, transformer_config
from gptoss_nemo.model.flex_attention import FlexSinkAttention, document_ids
from gptoss_nemo.model.megatron_config import RouterConfig
from gptoss_nemo.model.presets import tiny

pytestmark = pytest.mark.gpu


def _gpt20b_attention_config(layers_sliding):
    from gptoss_nemo.model.presets import gpt_oss_20b

    hf = gpt_oss_20b().replace(num_hidden_layers=len(layers_sliding),
                               layer_types=["sliding_attention" if s else "full_attention" for s in layers_sliding])
    return transformer_config(hf, None, "reference")


@pytest.mark.parametrize("layer_number,sliding", [(1, True), (2, False)])
def test_flex_attention_matches_megatron_attention(megatron_parallel, layer_number, sliding):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    config = _gpt20b_attention_config([True, False])
    torch.manual_seed(0)
    ref = DotProductAttention(config, layer_number, AttnMaskType.causal, "self")
    fused = FlexSinkAttention(config, layer_number, AttnMaskType.causal, "self")
    assert (fused.window is not None) == sliding
    with torch.no_grad():
        ref.softmax_offset.normal_(0, 1.0)
        fused.softmax_offset.copy_(ref.softmax_offset)
    s, b, heads, groups, d = 1024, 2, config.num_attention_heads, config.num_query_groups, config.kv_channels
    g = torch.Generator(device="cuda").manual_seed(1)
    leaves = [torch.randn(s, b, n, d, device="cuda", generator=g, dtype=torch.bfloat16) * 2
              for n in (heads, groups, groups)]
    grad_out = torch.randn(s, b, heads * d, device="cuda", generator=g, dtype=torch.bfloat16)

    def run(module=None):
        xs = [t.clone().double().requires_grad_() if module is None else t.clone().requires_grad_() for t in leaves]
        if module is None:  # the definition, float64, [b, heads, s, d] layout
            sink = ref.softmax_offset.detach().double().requires_grad_()
            q, k, v = (t.permute(1, 2, 0, 3) for t in xs)
            out = dense_sink_attention(q, k, v, sink, config.kv_channels ** -0.5, fused.window)
            out = out.permute(2, 0, 1, 3).reshape(s, b, heads * d)
            params = [sink]
        else:
            module.zero_grad()
            out = module(*xs, attention_mask=None)
            params = [module.softmax_offset]
        (out.double() * grad_out.double()).sum().backward()
        return [out.detach()] + [x.grad for x in xs] + [p.grad for p in params]

    truth, r, f = run(), run(ref), run(fused)
    names = ["out", "d_query", "d_key", "d_value", "d_sink"]
    errs = {n: (rel(rr, t), rel(ff, t)) for n, t, rr, ff in zip(names, truth, r, f)}
    print(f"RESULT flex attention ({'sliding 128' if sliding else 'full'}, 64/8 heads, s={s}, b={b}, BF16) "
          "rel. error vs float64, megatron reference / fused: "
          + ", ".join(f"{n} {a:.2e} / {c:.2e}" for n, (a, c) in errs.items()))
    for n, (a, c) in errs.items():
        assert c <= 2 * a + 1e-3, (n, a, c)


def test_flex_attention_keeps_packed_documents_apart(megatron_parallel):
    from megatron.core.transformer.enums import AttnMaskType

    config = _gpt20b_attention_config([False])
    fused = FlexSinkAttention(config, 1, AttnMaskType.causal, "self")
    with torch.no_grad():
        fused.softmax_offset.normal_(0, 1.0)
    s, b, heads, groups, d = 1024, 2, config.num_attention_heads, config.num_query_groups, config.kv_channels
    g = torch.Generator(device="cuda").manual_seed(2)
    leaves = [torch.randn(s, b, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
              for n in (heads, groups, groups)]
    pos = torch.cat([torch.arange(300), torch.arange(500), torch.arange(224)]).to("cuda").expand(b, s).clone()
    pos[1] = torch.arange(s, device="cuda")
    docs = document_ids(pos)
    xs = [t.clone().requires_grad_() for t in leaves]
    out = fused(*xs, attention_mask=docs)
    out.float().square().sum().backward()
    xd = [t.clone().double().requires_grad_() for t in leaves]
    sink = fused.softmax_offset.detach().double().requires_grad_()
    q, k, v = (t.permute(1, 2, 0, 3) for t in xd)
    truth = dense_sink_attention(q, k, v, sink, d ** -0.5, None, docs).permute(2, 0, 1, 3).reshape(s, b, -1)
    truth.square().sum().backward()
    errs = [rel(out, truth)] + [rel(a.grad, c.grad) for a, c in zip(xs, xd)] + [rel(fused.softmax_offset.grad, sink.grad)]
    print("RESULT flex attention, 3 packed documents: rel. error vs float64 (out, dq, dk, dv, dsink) "
          + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 2e-2
    # Gradient isolation: the second document's keys get nothing from the first document's loss.
    xs2 = [t.clone().requires_grad_() for t in leaves]
    fused(*xs2, attention_mask=docs)[:300, 0].float().sum().backward()
    assert xs2[1].grad[300:, 0].abs().max().item() == 0 and xs2[1].grad[:300, 0].abs().max().item() > 0


def _tiny_pair(kernels_a="reference", kernels_b="fused", dtype=torch.bfloat16):
    """Two tiny models (4 layers, 8 experts) with the same weights, the given kernels."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    hf = tiny()
    models = []
    for k in (kernels_a, kernels_b):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(1234)
        tc = transformer_config(hf, RouterConfig(), impl=k, params_dtype=dtype)
        models.append(build_model(hf, tc))
    models[1].load_state_dict(models[0].state_dict())
    return hf, models


def _loss_and_grads(model, ids, pos, labels):
    model.zero_grad()
    loss = model(ids, pos, attention_mask=None, labels=labels).float().mean()
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_model_matches_reference_model(megatron_parallel):
    """Whole tiny models, BF16, 2 x 512 tokens: loss and every parameter's gradient, reference vs fused kernels,
    both against an FP32 reference-kernel model with the same weights."""
    hf, (ref, fused) = _tiny_pair()
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(1234)
    truth_model = build_model(hf, transformer_config(hf, RouterConfig(), impl="reference", params_dtype=torch.float32,
                                                     bf16=False))
    truth_model.load_state_dict({k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                                 for k, v in ref.state_dict().items()})
    assert list(ref.state_dict()) == list(fused.state_dict())
    g = torch.Generator(device="cuda").manual_seed(3)
    ids = torch.randint(0, hf.vocab_size, (2, 513), device="cuda", generator=g)
    pos = torch.arange(512, device="cuda").expand(2, -1)
    batch = ids[:, :-1], pos, ids[:, 1:]
    lt, gt = _loss_and_grads(truth_model, *batch)
    lr, gr = _loss_and_grads(ref, *batch)
    lf, gf = _loss_and_grads(fused, *batch)
    assert set(gr) == set(gf) == set(gt)
    worst = max(gt, key=lambda n: rel(gf[n], gt[n]) - 2 * rel(gr[n], gt[n]))
    err_r = {n: rel(gr[n], gt[n]) for n in gt}
    err_f = {n: rel(gf[n], gt[n]) for n in gt}
    print(f"RESULT tiny model fwd+bwd, loss FP32 {lt:.6f} / BF16 reference {lr:.6f} / BF16 fused {lf:.6f}; "
          f"gradient rel. error vs FP32, median over {len(gt)} params: reference "
          f"{sorted(err_r.values())[len(gt) // 2]:.2e}, fused {sorted(err_f.values())[len(gt) // 2]:.2e}; "
          f"worst fused param {worst}: {err_f[worst]:.2e} (reference {err_r[worst]:.2e})")
    assert abs(lf - lt) <= 2 * abs(lr - lt) + 1e-3
    for n in gt:
        assert err_f[n] <= 2 * err_r[n] + 2e-2, (n, err_r[n], err_f[n])


def test_fused_experts_under_mxfp4_qat(megatron_parallel):
    """mtq.quantize (MXFP4 weight-only on the experts) on both kernels: the same quantizers (one per expert
    weight), the fused forward runs through them (it differs from the unquantized one as much as the reference's
    does) and agrees with the quantized reference; expert weights get gradients through the fake quant."""
    from gptoss_nemo.quantize import modelopt_state

    hf, (ref, fused) = _tiny_pair()
    g = torch.Generator(device="cuda").manual_seed(4)
    ids = torch.randint(0, hf.vocab_size, (2, 513), device="cuda", generator=g)
    pos = torch.arange(512, device="cuda").expand(2, -1)
    with torch.no_grad():
        before = fused(ids[:, :-1], pos, attention_mask=None).float()
        ref_before = ref(ids[:, :-1], pos, attention_mask=None).float()
    for m in (ref, fused):
        modelopt_state.quantize(m, "mxfp4")
    names = {k: sorted(n for n, _ in modelopt_state.expert_weight_quantizers(m)) for k, m in
             (("ref", ref), ("fused", fused))}
    assert names["ref"] == names["fused"] and len(names["ref"]) == 2 * hf.num_hidden_layers * hf.num_local_experts
    with torch.no_grad():
        out_r = ref(ids[:, :-1], pos, attention_mask=None).float()
        out_f = fused(ids[:, :-1], pos, attention_mask=None).float()
    moved, agree, kernels = rel(out_f, before), rel(out_f, out_r), rel(before, ref_before)
    print(f"RESULT MXFP4 QAT fused experts: logits rel. change from quantizing {moved:.3e}, fused vs reference "
          f"(both quantized) {agree:.3e}, unquantized {kernels:.3e}, {len(names['ref'])} expert weight quantizers in each")
    # Quantized, the two kernels differ as much as unquantized (BF16 rounding, routing flips), far less than
    # quantizing moves either: the fused forward runs on the fake-quantized weights.
    assert agree <= 2 * kernels + 1e-3 and agree < moved / 2, "the fused forward must use the fake-quantized weights"
    from gptoss_nemo.model.grouped_experts import expert_weight_cache

    batch = ids[:, :-1], pos, ids[:, 1:]
    _, plain = _loss_and_grads(fused, *batch)
    _, plain_again = _loss_and_grads(fused, *batch)  # run-to-run spread (atomics in scatter-adds), the yardstick
    with expert_weight_cache(fused):  # quantized once, reused by both micro-batches
        _, cached_once = _loss_and_grads(fused, *batch)
        fused(batch[0], pos, attention_mask=None, labels=batch[2]).float().mean().backward()
    twice = {n: p.grad.clone() for n, p in fused.named_parameters() if p.grad is not None}
    spread = max(rel(plain_again[n], plain[n]) for n in plain)
    cached = max(rel(cached_once[n], plain[n]) for n in plain)
    doubled = max(rel(twice[n], 2 * plain[n]) for n in plain)
    print(f"RESULT MXFP4 QAT, weights quantized once per global batch vs every micro-batch: max gradient rel. "
          f"difference {cached:.2e} (plain run twice: {spread:.2e}); two cached micro-batches vs 2x one: {doubled:.2e}")
    assert cached <= 2 * spread + 1e-3 and doubled <= 2 * spread + 1e-2
    w = fused.decoder.layers[0].mlp.experts.local_experts
    assert sum(int(plain[f"decoder.layers.0.mlp.experts.local_experts.{i}.linear_fc1.weight"].abs().sum() > 0)
               for i in range(len(w))) > 0


def test_fused_sft_follows_reference_sft_and_checkpoints_interchange(imported_tiny, tmp_path):
    """The SFT stage through the CLI with model.impl=fused and =reference from the same checkpoint (unpacked
    sequences, so both attend alike): the losses agree step by step within BF16 noise; the fused run's
    checkpoint loads into megatron's reference modules (the BF16 export builds them)."""
    from launch import stage_args, torchrun

    from gptoss_nemo.train.metrics_log import read_metrics

    losses = {}
    for i, kernels in enumerate(("reference", "fused")):
        out = tmp_path / kernels
        torchrun(1, *stage_args("sft", imported_tiny, out, "train.steps=20", "train.eval_every=0",
                                "train.save_every=20", "train.plots=false", "data.packing=false",
                                "optimizer.warmup_steps=5",
                                impl=kernels), port=29871 + i, timeout=300)
        losses[kernels] = [r["lm_loss"] for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    diff = [abs(f - r) / r for f, r in zip(losses["fused"], losses["reference"])]
    print(f"RESULT SFT 20 steps, fused vs reference kernels: lm_loss first {losses['reference'][0]:.4f} / "
          f"{losses['fused'][0]:.4f}, last {losses['reference'][-1]:.4f} / {losses['fused'][-1]:.4f}, max relative "
          f"difference {max(diff):.2e}")
    assert len(diff) == 20 and max(diff) < 0.02, diff
    assert losses["fused"][-1] < 0.95 * losses["fused"][0]
    export = tmp_path / "hf"
    torchrun(1, "-m", "gptoss_nemo", "export", str(tmp_path / "fused" / "checkpoints" / "step_0000020"), str(export),
             "--format", "bf16", "--impl", "reference", port=29873, timeout=200)
    assert (export / "config.json").is_file()
