"""GPU tier for QAT / PTQ (issue 5) and the exactness of the FP4 exports (issue 6).

- The MXFP4 codec (checkpoint/mxfp4.py, used by the export) equals ModelOpt's CUDA fake quant, which QAT's forward
  pass uses, on every element: random weights over many binades, exact E2M1 ties, all-zero blocks, FP32-subnormal
  blocks (flushed to zero by the kernel's fast-math arithmetic, and by the codec).
- The miniature of the published table (one GPU): recipes/qat_table_base.yaml trains the tiny gpt-oss (4
  layers, hidden 128, 8 experts top-4) on one-digit addition / subtraction (and the format of two-digit
  multiplication), then with MXFP4 QAT, and exports it in MXFP4 (the "original" checkpoint: on the MXFP4 grid,
  as gpt-oss is); recipes/qat_table.yaml fine-tunes it in BF16 on one-digit multiplication (100 new facts) at lr
  1e-4, then PTQ (MXFP4) and QAT (MXFP4, 150 steps); QAT NVFP4 and a BF16 control (the same 150 steps
  unquantized) start from the same SFT checkpoint. PTQ must lose at least 5% of the SFT validation loss, QAT
  recover at least 80% of that gap; the table's pass rates are greedy answers on held-out records (`gptoss-nemo
  eval`). The QAT / BF16 step-time ratio is reported.
- The NVFP4 QAT checkpoint's export dequantizes to exactly the fake-quantized weights its forward pass used (the
  MXFP4 export's exactness: test_sft_gpu.py, test_full_ep_gpu.py).

Prints `RESULT ...` lines (collected into tests/gpu/RESULTS.md)."""

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from export_check import fake_quant_exact
from launch import IMPL_ARGS, RECIPES, json_line, result, run_many, run_python, torchrun

from gptoss_nemo.checkpoint import mxfp4
from gptoss_nemo.config.load import load_recipe
from gptoss_nemo.config.pipeline import PipelineRecipe
from gptoss_nemo.train.metrics_log import read_metrics

pytestmark = pytest.mark.gpu
BASE, TABLE = RECIPES / "qat_table_base.yaml", RECIPES / "qat_table.yaml"
TABLE_RECIPE = load_recipe(PipelineRecipe, TABLE)
QAT_STEPS, EVAL = TABLE_RECIPE.qat.train.steps, TABLE_RECIPE.eval


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


def _pipeline(recipe: Path, run: Path, *overrides: str) -> dict:
    r = run_python("-m", "gptoss_nemo", "pipeline", str(recipe), f"run_dir={run}", *overrides, *IMPL_ARGS,
                   timeout=900)
    return json_line(r, "pipeline")


def _stage_recipe(table: Path, base_export: Path, out: Path, fmt: str | None) -> Path:
    """The table's QAT stage as a stage recipe (same checkpoint, data, schedule and steps): `gptoss-nemo qat` in
    another format, or (fmt None) `gptoss-nemo sft`, the BF16 control."""
    from omegaconf import OmegaConf

    stage = dataclasses.asdict(load_recipe(PipelineRecipe, TABLE, [f"run_dir={table}", f"model.hf={base_export}"])
                               .qat_recipe())
    stage["train"]["out_dir"] = str(out)
    if fmt:
        stage["quant"]["format"] = fmt
    else:
        del stage["quant"]
    path = out.with_suffix(".yaml")
    path.write_text(OmegaConf.to_yaml(stage))
    return path


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    """recipes/qat_table_base.yaml (the MXFP4-trained base), then recipes/qat_table.yaml (SFT on the new task,
    PTQ, QAT MXFP4, eval). As soon as the table's SFT checkpoint exists, and while its pipeline goes on: QAT NVFP4
    and the BF16 control from that checkpoint with the QAT stage's schedule, then `gptoss-nemo eval` of both on the
    pipeline's held-out records."""
    from gptoss_nemo.pipeline.run import outputs

    root = tmp_path_factory.mktemp("qat-table")
    base = root / "base" / "export" / "mxfp4"
    _pipeline(BASE, root / "base")
    table = root / "table"
    sft_done = outputs(load_recipe(PipelineRecipe, TABLE, [f"run_dir={table}", f"model.hf={base}"]))["sft"]
    runs = {"qat_nvfp4": root / "qat-nvfp4", "bf16_control": root / "bf16-control"}  # eval row -> its run
    jobs = [["-m", "gptoss_nemo", "qat", str(_stage_recipe(table, base, runs["qat_nvfp4"], "nvfp4")), *IMPL_ARGS],
            ["-m", "gptoss_nemo", "sft", str(_stage_recipe(table, base, runs["bf16_control"], None)), *IMPL_ARGS]]
    with ThreadPoolExecutor(1) as pool:
        pipeline = pool.submit(_pipeline, TABLE, table, f"model.hf={base}")
        while not all(p.exists() for p in sft_done):
            if pipeline.done():  # it failed before its SFT stage ended: its error
                pipeline.result()
                pytest.fail(f"the table's pipeline ended without {sft_done}")
            time.sleep(2)
        run_many(jobs)
        data = [a for source in EVAL.data for a in ("--data", source)]
        r = run_python("-m", "gptoss_nemo", "eval", *(str(run / "checkpoints" / f"step_{QAT_STEPS:07d}")
                                                      for run in runs.values()),
                       *data, "--checker", EVAL.checker, "--samples", str(EVAL.samples), "--max-new-tokens",
                       str(EVAL.max_new_tokens), *IMPL_ARGS, timeout=400)
        summary = pipeline.result()
    rows = {r["stage"]: r for r in summary["eval"]} | dict(zip(runs, json_line(r, "eval")))
    return {"eval": rows, "mxfp4": table / "qat", "nvfp4": runs["qat_nvfp4"], "bf16_control": runs["bf16_control"],
            "ptq": json.loads((table / "ptq" / "ptq.json").read_text())}


def _last_val(run: Path) -> float:
    return [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]["val_loss"]


def test_qat_recovers_what_ptq_loses(table_run):
    """The published situation in miniature: PTQ of the BF16 fine-tune loses a clear part of its gain (at least
    5% of the SFT validation loss), and QAT recovers at least 80% of that gap (the issue's ratio). QAT's distance
    from the BF16 control (the same steps without quantization) is reported beside it, not asserted: continued
    training alone also lowers the loss. Validation loss: megatron, the SFT data's validation batches."""
    ptq = table_run["ptq"]
    table = {"sft_bf16": ptq["val_loss_bf16"], "ptq_mxfp4": ptq["val_loss"]}
    errors = {}
    for fmt in ("mxfp4", "nvfp4"):
        rows = read_metrics(table_run[fmt] / "metrics.jsonl")
        # the same SFT checkpoint: its BF16 validation loss again, up to the MoE's atomics (1.4e-4 seen with three
        # processes sharing the GPU); another checkpoint would be far off
        assert rows[0]["step"] == 0 and rows[0]["val_loss_bf16"] == pytest.approx(table["sft_bf16"], rel=1e-3)
        table[f"ptq_{fmt}_at_qat_start"] = rows[0]["val_loss"]
        table[f"qat_{fmt}"] = _last_val(table_run[fmt])
        assert rows[-1]["step"] == QAT_STEPS and all("aux_loss" in r for r in rows[1:])
        errors[fmt] = json.loads((table_run[fmt] / "quant_error.json").read_text())
        assert len(errors[fmt]["before"]) == len(errors[fmt]["after"]) == 4
    table["bf16_control"] = _last_val(table_run["bf16_control"])
    gap = table["ptq_mxfp4"] - table["sft_bf16"]
    recovered = (table["ptq_mxfp4"] - table["qat_mxfp4"]) / gap
    nv_gap = table["ptq_nvfp4_at_qat_start"] - table["sft_bf16"]

    def median_seconds(run: Path) -> float:
        s = sorted(r["seconds"] for r in read_metrics(run / "metrics.jsonl") if r["step"] > 1)
        return s[len(s) // 2]
    bf16_s = median_seconds(table_run["bf16_control"])
    summary = {"val_loss": table, "ptq_gap_mxfp4": gap, "ptq_gap_relative": gap / table["sft_bf16"],
               "qat_recovered_fraction_mxfp4": recovered, "ptq_gap_nvfp4": nv_gap,
               "qat_recovered_fraction_nvfp4": (table["ptq_nvfp4_at_qat_start"] - table["qat_nvfp4"]) / nv_gap
               if nv_gap > 0 else None,
               "qat_minus_bf16_control_over_ptq_gap": (table["qat_mxfp4"] - table["bf16_control"]) / gap,
               "quant_error_mean_rel_before_after": {f: [[round(r["mean_rel"], 4) for r in errors[f][k]]
                                                         for k in ("before", "after")] for f in errors},
               "step_seconds": {"bf16": bf16_s, "qat_nvfp4": median_seconds(table_run["nvfp4"])},
               "qat_nvfp4_over_bf16_step_time": median_seconds(table_run["nvfp4"]) / bf16_s,
               # both ran beside the table's pipeline (and each other): benchmarks/train_step.py times them alone
               "step_times_measured_alone": False}
    result("QAT vs PTQ on the new task (megatron, validation batches)", summary)
    assert gap >= 0.05 * table["sft_bf16"], f"PTQ did not measurably hurt: {summary}"
    assert recovered >= 0.8, summary


def test_eval_table(table_run):
    """The table of the README: the pipeline's rows (original base, SFT, SFT + PTQ, SFT + QAT MXFP4) and, with
    `gptoss-nemo eval` on the same held-out records, SFT + QAT NVFP4 and the BF16 control; greedy pass rates."""
    table = {name: {"val_loss": row["val_loss"], "pass_rate": row["pass_rate"]}
             for name, row in table_run["eval"].items()}
    result(f"eval table ({' '.join(EVAL.data)}, greedy, transformers)", table)
    assert list(table) == ["original", "sft", "ptq_mxfp4", "qat_mxfp4", "qat_nvfp4", "bf16_control"], list(table)
    assert table["sft"]["pass_rate"] > table["original"]["pass_rate"]
    assert table["ptq_mxfp4"]["pass_rate"] < table["sft"]["pass_rate"] <= table["qat_mxfp4"]["pass_rate"] + 0.1


def test_nvfp4_export_matches_the_fake_quant(table_run, tmp_path):
    """The NVFP4 QAT checkpoint in ModelOpt's HF NVFP4 layout: dequantized (E2M1 x (E4M3 scale x FP32 scale)) it
    equals ModelOpt's fake-quantized weights (its Triton kernel) element for element."""
    ckpt = table_run["nvfp4"] / "checkpoints" / f"step_{QAT_STEPS:07d}"
    for i, fmt in enumerate(("bf16", "nvfp4")):
        torchrun(1, "-m", "gptoss_nemo", "export", str(ckpt), str(tmp_path / fmt), "--format", fmt, *IMPL_ARGS,
                 port=29840 + i)
    config = json.loads((tmp_path / "nvfp4" / "config.json").read_text())["quantization_config"]
    exact = fake_quant_exact(tmp_path / "nvfp4", tmp_path / "bf16", "nvfp4")
    result("QAT NVFP4 export (ModelOpt HF layout) vs fake-quant weights", {**exact, "quant_algo": config["quant_algo"]})
    assert config["quant_algo"] == "W4A16_NVFP4" and exact["elements"] and exact["equal"] == exact["elements"]
