"""Logit parity helpers shared by the one-GPU tests and the multi-GPU worker (not a test module)."""

from __future__ import annotations

import torch

from gptoss_nemo.evaluate.logits import compare, megatron_logits

SEQ, BATCH = 512, 4


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in FP64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def token_ids(vocab_size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=gen).cuda()


def reference_logits(hf_dir, ids: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """transformers' GptOssForCausalLM, eager attention (the implementation with sinks), same GPU."""
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").cuda().eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    del model
    return out


def rebuilt_copy(model, build, **overrides):
    """A model from `build(**overrides)` (e.g. params_dtype=torch.float32, moe_router_dtype=None) holding exactly
    `model`'s weights."""
    copy = build(**overrides)
    with torch.no_grad():
        for (n_new, p_new), (n_old, p_old) in zip(copy.named_parameters(), model.named_parameters(), strict=True):
            assert n_new == n_old
            p_new.copy_(p_old)
    return copy


def fp32_copy(model_bf16, build):
    """An FP32 model holding exactly the BF16 model's weights."""
    return rebuilt_copy(model_bf16, build, params_dtype=torch.float32)


def bf16_router_copy(model_bf16, build):
    """The same BF16 model routing in BF16 as transformers does (router logits and top-k softmax in the input's
    dtype; training routes in FP32)."""
    return rebuilt_copy(model_bf16, build, moe_router_dtype=None)


def megatron_variants(model, ids: torch.Tensor, build) -> tuple:
    """Megatron's logits three ways (None off the last pipeline stage): the BF16 model as loaded (routing in FP32,
    as in training), an FP32 copy, and a copy routing in BF16 as transformers does. `build(**overrides)` builds
    the same rank's model."""
    return (megatron_logits(model, ids), megatron_logits(fp32_copy(model, build), ids),
            megatron_logits(bf16_router_copy(model, build), ids))


def parity_report(hf_dir, ids, mc16: torch.Tensor, mc32: torch.Tensor, mc16_bf16_router: torch.Tensor) -> dict:
    """Megatron vs transformers in FP32 and in BF16 (megatron routing in FP32 as in training, and in BF16 as
    transformers does), and transformers' own BF16 noise (BF16 vs FP32)."""
    hf32 = reference_logits(hf_dir, ids, torch.float32)
    hf16 = reference_logits(hf_dir, ids, torch.bfloat16)
    return {
        "fp32": compare(hf32, mc32),
        "bf16": compare(hf16, mc16),
        "bf16_routing_as_reference": compare(hf16, mc16_bf16_router),
        "megatron_bf16_vs_reference_fp32": compare(hf32, mc16),
        "reference_bf16_vs_reference_fp32": compare(hf32, hf16),
    }


def as_accurate_as_reference(ours: dict, reference: dict) -> bool:
    """Megatron's BF16 logits lie as close to transformers' FP32 logits as transformers' own BF16 logits do: at most
    1.5x their cosine deficit, at most 1 point less top-1 (each {"min_cos", "top1"} against the FP32 logits)."""
    return 1 - ours["min_cos"] <= 1.5 * (1 - reference["min_cos"]) and ours["top1"] >= reference["top1"] - 0.01


def parity_failures(r: dict, cos: float, top1: float) -> list[str]:
    """FP32 must meet the thresholds; BF16 megatron must be as accurate as transformers' BF16
    (as_accurate_as_reference)."""
    bad = []
    if r["fp32"]["min_cos"] < cos or r["fp32"]["top1"] < top1:
        bad.append(f"fp32 parity {r['fp32']['min_cos']:.7f} / {r['fp32']['top1']:.4f} below {cos} / {top1}")
    ours, floor = r["megatron_bf16_vs_reference_fp32"], r["reference_bf16_vs_reference_fp32"]
    if not as_accurate_as_reference(ours, floor):
        bad.append(f"bf16 megatron {ours['min_cos']:.6f} / {ours['top1']:.4f} worse than transformers' own bf16 "
                   f"{floor['min_cos']:.6f} / {floor['top1']:.4f}")
    return bad


def bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """How many tensors of `b` are in `a` with the same dtype and bits; the first that is not."""
    same = [n for n in b if n in a and a[n].dtype == b[n].dtype and torch.equal(a[n], b[n])]
    bad = [n for n in b if n not in same] + sorted(set(a) - set(b))
    return {"tensors": len(b), "identical": len(same), "first_difference": bad[0] if bad else None}
