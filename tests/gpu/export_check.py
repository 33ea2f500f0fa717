"""The QAT export's acceptance, shared by the one-GPU QAT test and the EP2 test: a checkpoint's MXFP4 export
dequantizes to exactly the fake-quantized weights its forward pass used (read through its BF16 export, which goes
through ModelOpt's quantizers), and `verify-export` finds transformers on the export = megatron on the checkpoint."""

from pathlib import Path

import torch
from launch import IMPL_ARGS, json_line, result, torchrun
from parity import as_accurate_as_reference

from gptoss_nemo.checkpoint import mxfp4, nvfp4
from gptoss_nemo.checkpoint.hf_layout import read_tensors


def check_mxfp4_export(ckpt: Path, out: Path, *, label: str, port: int, nproc: int = 1, layout: tuple[str, ...] = (),
                       mxfp4_export: Path | None = None) -> dict:
    """Export CKPT as BF16 and MXFP4 (or take its MXFP4 export `mxfp4_export`, e.g. the pipeline's) under the given
    layout (torchrun with NPROC processes), compare every expert element, run verify-export (one GPU). Returns
    verify-export's summary; asserts the acceptance."""
    packed_dir = mxfp4_export or out / "mxfp4"
    for i, fmt in enumerate(("bf16",) if mxfp4_export else ("bf16", "mxfp4")):
        torchrun(nproc, "-m", "gptoss_nemo", "export", str(ckpt), str(out / fmt), "--format", fmt, *layout,
                 *IMPL_ARGS, port=port + i, timeout=300)
    exact = fake_quant_exact(packed_dir, out / "bf16", "mxfp4")
    result(f"{label}: MXFP4 export vs fake-quant weights", exact)
    assert exact["elements"] and exact["equal"] == exact["elements"]
    r = torchrun(1, "-m", "gptoss_nemo", "verify-export", str(packed_dir), "--against", str(ckpt),
                 "--data", "synthetic:arithmetic:400:7:1", "--samples", "8", *IMPL_ARGS, port=port + 2,
                 timeout=300)
    verified = json_line(r, "verify_export")
    result(f"{label}: verify-export (MXFP4 export in transformers vs megatron fake quant)", verified)
    assert within_bf16_criterion(verified), verified
    return verified


def fake_quant_exact(packed_dir: Path, bf16_dir: Path, fmt: str) -> dict:
    """How many expert elements of an MXFP4 / NVFP4 export dequantize to exactly the BF16 export's (the
    fake-quantized weights the checkpoint computes with)."""
    fq, packed = read_tensors(bf16_dir), read_tensors(packed_dir)
    total = equal = 0
    for name in [n for n in fq if n.endswith(("gate_up_proj", "down_proj"))]:
        if fmt == "mxfp4":
            deq = mxfp4.dequantize(packed[name + "_blocks"], packed[name + "_scales"]).transpose(-1, -2)
        else:  # ModelOpt's HF NVFP4 layout: per expert, E2M1 x (E4M3 scale x the projection's FP32 scale)
            deq = torch.stack([nvfp4.dequantize(packed[name][e].t(), packed[name + "_weight_scale"][e].t(),
                                                packed[name + "_weight_scale_2"]).t()
                               for e in range(fq[name].shape[0])])
        total += deq.numel()
        equal += int((deq == fq[name]).sum())
    return {"elements": total, "equal": equal}


def exported_equal(a: Path, b: Path) -> dict:
    """Two Hugging Face exports: how many of b's tensors a holds with the same dtype and bits."""
    ta, tb = read_tensors(a), read_tensors(b)
    same = sum(k in ta and ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in tb)
    return {"tensors": len(tb), "identical": same, "extra": sorted(set(ta) - set(tb))[:3]}


def within_bf16_criterion(verified: dict) -> bool:
    """verify-export's BF16 criterion: issue 3's thresholds (cosine >= 0.9999 per sequence, top-1 >= 99%) or, where
    BF16 rounding alone exceeds them, the megatron model as accurate as transformers at BF16 (both against
    transformers' FP32 logits: parity.as_accurate_as_reference). On tiny models transformers' own BF16 misses the
    flat thresholds against its FP32 (random weights: 97.5% top-1; trained: 98.7-99.4%, tests/gpu/RESULTS.md)."""
    flat = verified["min_cos"] >= 0.9999 and verified["top1"] >= 0.99
    return flat or as_accurate_as_reference(verified["megatron_vs_transformers_fp32"],
                                            verified["transformers_bf16_vs_fp32"])
