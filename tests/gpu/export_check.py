"""The QAT export's acceptance, shared by the one-GPU QAT test and the EP2 test: a checkpoint's MXFP4 export
dequantizes to exactly the fake-quantized weights its forward pass used (read through its BF16 export, which goes
through ModelOpt's quantizers), and `verify-export` finds transformers on the export = megatron on the checkpoint."""

from pathlib import Path

from launch import json_line, result, torchrun
from parity import as_accurate_as_reference

from gptoss_nemo.checkpoint import mxfp4
from gptoss_nemo.checkpoint.hf_layout import read_tensors


def check_mxfp4_export(ckpt: Path, out: Path, *, label: str, port: int, nproc: int = 1, layout: tuple[str, ...] = (),
                       mxfp4_export: Path | None = None) -> dict:
    """Export CKPT as BF16 and MXFP4 (or take its MXFP4 export `mxfp4_export`, e.g. the pipeline's) under the given
    layout (torchrun with NPROC processes), compare every expert element, run verify-export (one GPU). Returns
    verify-export's summary; asserts the acceptance."""
    packed_dir = mxfp4_export or out / "mxfp4"
    for i, fmt in enumerate(("bf16",) if mxfp4_export else ("bf16", "mxfp4")):
        torchrun(nproc, "-m", "gptoss_nemo", "export", str(ckpt), str(out / fmt), "--format", fmt, *layout,
                 "--local-spec", port=port + i, timeout=300)
    fq, packed = read_tensors(out / "bf16"), read_tensors(packed_dir)
    total = equal = 0
    for name in [n for n in fq if n.endswith(("gate_up_proj", "down_proj"))]:
        deq = mxfp4.dequantize(packed[name + "_blocks"], packed[name + "_scales"]).transpose(-1, -2)
        total += deq.numel()
        equal += int((deq == fq[name]).sum())
    result(f"{label}: MXFP4 export vs fake-quant weights", {"elements": total, "equal": equal})
    assert total and equal == total
    r = torchrun(1, "-m", "gptoss_nemo", "verify-export", str(packed_dir), "--against", str(ckpt),
                 "--data", "synthetic:arithmetic:400:7:1", "--samples", "8", "--local-spec", port=port + 2,
                 timeout=300)
    verified = json_line(r, "verify_export")
    result(f"{label}: verify-export (MXFP4 export in transformers vs megatron fake quant)", verified)
    assert within_bf16_criterion(verified), verified
    return verified


def within_bf16_criterion(verified: dict) -> bool:
    """verify-export's BF16 criterion: issue 3's thresholds (cosine >= 0.9999 per sequence, top-1 >= 99%) or, where
    BF16 rounding alone exceeds them, the megatron model as accurate as transformers at BF16 (both against
    transformers' FP32 logits: parity.as_accurate_as_reference). On tiny models transformers' own BF16 misses the
    flat thresholds against its FP32 (random weights: 97.5% top-1; trained: 98.7-99.4%, tests/gpu/RESULTS.md)."""
    flat = verified["min_cos"] >= 0.9999 and verified["top1"] >= 0.99
    return flat or as_accurate_as_reference(verified["megatron_vs_transformers_fp32"],
                                            verified["transformers_bf16_vs_fp32"])
