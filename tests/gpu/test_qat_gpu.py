"""GPU tier for QAT / PTQ (issue 5) and the exactness of the MXFP4 export (issue 6).

- The MXFP4 codec (checkpoint/mxfp4.py, used by the export) equals ModelOpt's CUDA fake quant, which QAT's forward
  pass uses, on every element: random weights over many binades, exact E2M1 ties, all-zero blocks, FP32-subnormal
  blocks (flushed to zero by the kernel's fast-math arithmetic, and by the codec).
- The miniature of the published table on the shipped task (one GPU). Task and size: the tiny gpt-oss (4 layers,
  hidden 128, 8 experts top-4) on one-digit arithmetic (`synthetic:arithmetic:N:SEED:1`, 200 facts x 4
  phrasings), which it learns well enough in 250 SFT steps for greedy answers to be checkable. Rows: the original
  tiny checkpoint, BF16 SFT, SFT + PTQ (MXFP4), SFT + QAT (MXFP4), SFT + QAT (NVFP4); columns: validation loss
  (megatron, the training validation batches) and, through `gptoss-nemo eval`, loss and greedy pass rate on
  another seed's records. QAT recovers at least 80% of the PTQ validation-loss gap, also counted against a BF16
  control (the SFT model trained the same extra steps at the same learning rate) so that continued training is
  not taken for recovery; QAT step time relative to that BF16 run on the same shapes.
- The QAT checkpoint's MXFP4 export dequantizes to exactly the fake-quantized weights its forward pass used.

Prints `RESULT ...` lines (collected into tests/gpu/RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export_check import check_mxfp4_export
from launch import env, json_line, jobs_per_gpu, result, run_many, stage_args, torchrun

from gptoss_nemo.checkpoint import mxfp4
from gptoss_nemo.checkpoint.hf_layout import read_tensors
from gptoss_nemo.train.metrics_log import read_metrics

pytestmark = pytest.mark.gpu
QAT_STEPS = 50
TASK = "data.train=[synthetic:arithmetic:4000:0:1]"


def _modelopt_mxfp4_quantizer():
    from gptoss_nemo.quantize.modelopt_state import weight_quantizer

    return weight_quantizer("mxfp4")


def _hard_weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(512, 256, generator=g) * 10.0 ** torch.empty(512, 1).uniform_(-6, 3, generator=g)]
    # exact ties: every E2M1 midpoint x 2^e, with a block maximum that fixes the scale at 2^e
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    for e in (-130, -20, 0, 7):
        block = torch.cat([torch.tensor([6.0]), mids.repeat(5)[:31]]) * 2.0 ** e
        rows.append((block * torch.where(torch.rand(32, generator=g) < 0.5, -1.0, 1.0)).repeat(8).reshape(1, 256))
    rows.append(torch.zeros(1, 256))  # an all-zero block row
    rows.append(torch.full((1, 256), 1e-38))  # FP32-subnormal blocks (the kernel flushes them to zero)
    return torch.cat(rows).to(torch.bfloat16).cuda()


def _underflow_corner() -> torch.Tensor:
    """Blocks whose amax is normal but amax / 6 is not (amax in [2**-126, 6 * 2**-126)): the kernel's flushed
    division and its 2**-127 unscale are not pinned down by the tensor above; reported, not asserted."""
    g = torch.Generator().manual_seed(1)
    return (torch.rand(4, 256, generator=g) * 5 + 1).mul(2.0 ** -126).to(torch.bfloat16).cuda()


def test_mxfp4_codec_equals_modelopt_cuda_fake_quant():
    from modelopt.torch.quantization.qtensor import MXFP4QTensor

    w = _hard_weights()
    theirs = _modelopt_mxfp4_quantizer()(w)
    ours = mxfp4.fake_quantize(w)
    differ = int((theirs != ours).sum())
    # the reason for our own codec: ModelOpt's MXFP4QTensor (its export path) rounds ties differently
    qt, scale = MXFP4QTensor.quantize(w, 32)
    qtensor_diff = int((qt.dequantize(scale=scale, block_sizes={-1: 32}, dtype=torch.bfloat16) != theirs).sum())
    corner = _underflow_corner()
    corner_differ = int((_modelopt_mxfp4_quantizer()(corner) != mxfp4.fake_quantize(corner)).sum())
    result("MXFP4 codec vs ModelOpt CUDA fake quant", {"elements": w.numel(), "differ": differ,
                                                       "MXFP4QTensor_differs_from_fake_quant": qtensor_diff,
                                                       "underflow_corner_elements": corner.numel(),
                                                       "underflow_corner_differ": corner_differ})
    assert differ == 0


@pytest.fixture(scope="module")
def sft_base(imported_tiny, tmp_path_factory):
    """250 BF16 SFT steps of the tiny model on one-digit arithmetic (one GPU): the run directory."""
    out = tmp_path_factory.mktemp("qat-base") / "sft"
    torchrun(1, *stage_args("sft", imported_tiny, out, TASK, "train.steps=250", "optimizer.lr=1e-3",
                            "optimizer.min_lr=1e-4", "train.eval_every=125", "train.save_every=250",
                            "train.plots=false"), port=29879, timeout=400)
    return out


@pytest.fixture(scope="module")
def sft_last(sft_base):
    return sft_base / "checkpoints" / "step_0000250"


@pytest.fixture(scope="module")
def qat_runs(sft_last, tmp_path_factory):
    """From the SFT run's last checkpoint, the same number of steps at the same learning rate: QAT MXFP4, QAT NVFP4
    and the BF16 control (SFT continued: what the steps alone buy); and PTQ MXFP4. One process per GPU."""
    root = tmp_path_factory.mktemp("qat")
    common = (TASK, f"train.steps={QAT_STEPS}", "train.eval_every=25", f"train.save_every={QAT_STEPS}",
              "optimizer.lr=5e-5", "optimizer.min_lr=5e-6", "train.plots=false")
    jobs = {"mxfp4": stage_args("qat", sft_last, root / "qat-mxfp4", *common, "quant.format=mxfp4"),
            "nvfp4": stage_args("qat", sft_last, root / "qat-nvfp4", *common, "quant.format=nvfp4"),
            "bf16_control": stage_args("sft", sft_last, root / "bf16-control", *common),
            "ptq": stage_args("ptq", sft_last, root / "ptq", *common)}
    outputs = dict(zip(jobs, run_many(list(jobs.values()))))
    runs = {name: root / {"mxfp4": "qat-mxfp4", "nvfp4": "qat-nvfp4", "bf16_control": "bf16-control"}[name]
            for name in ("mxfp4", "nvfp4", "bf16_control")}
    runs["ptq"] = next(json.loads(line)["ptq"] for line in outputs["ptq"].splitlines() if line.startswith('{"ptq"'))
    return runs


def test_qat_recovers_the_ptq_gap_and_exports_exactly(qat_runs, tmp_path):
    ptq = qat_runs["ptq"]
    table = {"sft_bf16": ptq["val_loss_bf16"], "ptq_mxfp4": ptq["val_loss"]}
    errors = {}
    for fmt in ("mxfp4", "nvfp4"):
        rows = read_metrics(qat_runs[fmt] / "metrics.jsonl")
        first = rows[0]
        assert first["step"] == 0 and first["val_loss_bf16"] == pytest.approx(ptq["val_loss_bf16"], rel=1e-4), first
        table[f"ptq_{fmt}_at_qat_start"] = first["val_loss"]
        table[f"qat_{fmt}"] = rows[-1]["val_loss"]
        assert rows[-1]["step"] == QAT_STEPS and all("aux_loss" in r for r in rows[1:])
        errors[fmt] = json.loads((qat_runs[fmt] / "quant_error.json").read_text())
        assert len(errors[fmt]["before"]) == len(errors[fmt]["after"]) == 4
    assert table["ptq_mxfp4_at_qat_start"] == pytest.approx(table["ptq_mxfp4"], rel=1e-4)
    control = read_metrics(qat_runs["bf16_control"] / "metrics.jsonl")
    table["bf16_control"] = control[-1]["val_loss"]  # the SFT model after the same steps in BF16
    gap = table["ptq_mxfp4"] - table["sft_bf16"]
    # the ratio, with loss_SFT read at QAT's start, and the same ratio against the BF16 control (the
    # quantization loss QAT removes, not the progress the extra steps make anyway): the control decides
    recovered = (table["ptq_mxfp4"] - table["qat_mxfp4"]) / gap if gap > 0 else float("nan")
    controlled = {f: ((table[f"qat_{f}"] - table["bf16_control"]) / (table[p] - table["sft_bf16"])
                      if table[p] > table["sft_bf16"] else None)
                  for f, p in (("mxfp4", "ptq_mxfp4"), ("nvfp4", "ptq_nvfp4_at_qat_start"))}
    nv_gap = table["ptq_nvfp4_at_qat_start"] - table["sft_bf16"]
    summary = {"val_loss": table, "ptq_gap_mxfp4": gap, "qat_recovered_fraction_mxfp4": recovered,
               "ptq_gap_nvfp4": nv_gap, "qat_recovered_fraction_nvfp4":
                   (table["ptq_nvfp4_at_qat_start"] - table["qat_nvfp4"]) / nv_gap if nv_gap > 0 else None,
               "remaining_gap_vs_bf16_control_over_ptq_gap": controlled,
               "quant_error_mean_rel_before_after": {f: [[round(r["mean_rel"], 4) for r in errors[f][k]]
                                                         for k in ("before", "after")] for f in errors}}

    # QAT step time vs BF16 on the same shapes (the control: same steps, run beside them; median of the steps)
    def median_seconds(run: Path) -> float:
        s = sorted(r["seconds"] for r in read_metrics(run / "metrics.jsonl") if r["step"] > 1)
        return s[len(s) // 2]
    sft_s = median_seconds(qat_runs["bf16_control"])
    summary["step_seconds"] = {"bf16": sft_s, **{f"qat_{f}": median_seconds(qat_runs[f]) for f in errors}}
    summary["qat_over_bf16_step_time"] = {f: median_seconds(qat_runs[f]) / sft_s for f in errors}
    summary["runs_sharing_a_gpu"] = min(jobs_per_gpu(), 4)  # > 1: the step times were not measured alone
    result("QAT vs PTQ (megatron, validation batches)", summary)

    # The QAT checkpoint's exports: BF16 (the fake-quantized weights, through ModelOpt's quantizers) and MXFP4
    check_mxfp4_export(qat_runs["mxfp4"] / "checkpoints" / f"step_{QAT_STEPS:07d}", tmp_path,
                       label="QAT MXFP4 (EP1)", port=29887)
    assert gap > 0, f"PTQ did not hurt: {summary}"
    assert recovered >= 0.8, summary
    # against the control (the BF16 model trained the same steps): QAT ends less than the whole PTQ gap above it.
    # (A tighter bound needs a PTQ gap well above the spread of two continuations: not so on this task, whose
    # gap is ~0.3-1% of the loss; tests/gpu/RESULTS.md.)
    assert controlled["mxfp4"] is not None and controlled["mxfp4"] < 1.0, summary


def test_nvfp4_export_matches_the_fake_quant(qat_runs, tmp_path):
    """The NVFP4 QAT checkpoint in ModelOpt's HF NVFP4 layout: dequantized (E2M1 x (E4M3 scale x FP32 scale)) it
    equals ModelOpt's fake-quantized weights (its Triton kernel) element for element."""
    from gptoss_nemo.checkpoint import nvfp4

    ckpt = qat_runs["nvfp4"] / "checkpoints" / f"step_{QAT_STEPS:07d}"
    for i, fmt in enumerate(("bf16", "nvfp4")):
        torchrun(1, "-m", "gptoss_nemo", "export", str(ckpt), str(tmp_path / fmt), "--format", fmt, "--local-spec",
                 port=29840 + i)
    fq, packed = read_tensors(tmp_path / "bf16"), read_tensors(tmp_path / "nvfp4")
    config = json.loads((tmp_path / "nvfp4" / "config.json").read_text())["quantization_config"]
    total = equal = 0
    for name in [n for n in fq if n.endswith(("gate_up_proj", "down_proj"))]:
        for e in range(fq[name].shape[0]):
            deq = nvfp4.dequantize(packed[name][e].t(), packed[name + "_weight_scale"][e].t(),
                                   packed[name + "_weight_scale_2"]).t()
            total += deq.numel()
            equal += int((deq == fq[name][e]).sum())
    result("QAT NVFP4 export (ModelOpt HF layout) vs fake-quant weights", {"elements": total, "equal": equal,
                                                                            "quant_algo": config["quant_algo"]})
    assert config["quant_algo"] == "W4A16_NVFP4" and total and equal == total


def test_eval_table(qat_runs, sft_last, tiny_with_tokenizer):
    """`gptoss-nemo eval` on the five rows and the BF16 control (gptoss-nemo checkpoints are exported in-process),
    records of another seed."""
    ckpts = {"original tiny (HF MXFP4)": tiny_with_tokenizer, "SFT (BF16)": sft_last,
             "SFT + PTQ (MXFP4)": qat_runs["ptq"]["checkpoint"],
             "SFT + QAT (MXFP4)": qat_runs["mxfp4"] / "checkpoints" / f"step_{QAT_STEPS:07d}",
             "SFT + QAT (NVFP4)": qat_runs["nvfp4"] / "checkpoints" / f"step_{QAT_STEPS:07d}",
             "SFT + the same steps in BF16 (control)": qat_runs["bf16_control"] / "checkpoints" / f"step_{QAT_STEPS:07d}"}
    # one plain process (no torchrun): each gptoss-nemo checkpoint is exported in it with its own rendezvous
    r = subprocess.run([sys.executable, "-m", "gptoss_nemo", "eval", *map(str, ckpts.values()), "--data",
                        "synthetic:arithmetic:32:7:1", "--samples", "32", "--max-new-tokens", "32", "--local-spec"],
                       capture_output=True, text=True, env=env(), timeout=400)
    assert r.returncode == 0, r.stderr[-6000:]
    print(r.stdout)
    rows = json_line(r, "eval")
    table = {name: {"val_loss": row["val_loss"], "pass_rate": row["pass_rate"]} for name, row in zip(ckpts, rows)}
    result("eval table (synthetic:arithmetic:32:7:1, greedy, transformers)", table)
    assert len(rows) == 6 and table["SFT (BF16)"]["val_loss"] < table["original tiny (HF MXFP4)"]["val_loss"]
