"""GPU tier for the planner (issue 7): `gptoss-nemo plan` against the peak memory measured by training a
reduced-depth gpt-oss-20b-shaped model (real widths: hidden 2880, 64/8 heads of 64, 32 experts top-4 of width 2880,
the 201088-token vocabulary; 2 layers, one sliding-window and one full) at sequence 4096 on one GPU. The tiny model's
check is in test_sft_gpu.py (`test_sft_one_gpu_learns_and_logs`).

Prints `RESULT ...` lines (collected into tests/gpu/RESULTS.md)."""

import json

import pytest

from launch import IMPL_ARGS, RECIPE, kill_at_random_step, result, run_python, stage_args
from tiny_ckpt import checkpoint_with_tokenizer

from gptoss_nemo.model.presets import tiny
from gptoss_nemo.train.metrics_log import read_metrics

pytestmark = pytest.mark.gpu
SHAPE = dict(layers=2, hidden=2880, experts=32, expert_width=2880, heads=64, kv_heads=8, head_dim=64, top_k=4)
RUN = ("data.seq_length=4096", "train.global_batch_size=2", "train.micro_batch_size=1", "train.steps=100",
       "train.eval_every=0", "train.plots=false")


def test_planner_within_20_percent_of_measured_peak_20b_shaped(tmp_path):
    hf = checkpoint_with_tokenizer(tmp_path / "hf", tiny(**SHAPE))
    ckpt = tmp_path / "ckpt"
    run_python("-m", "gptoss_nemo", "import", str(hf), str(ckpt), *IMPL_ARGS, timeout=600)
    # three optimizer steps, then SIGKILL: peak memory is reached by the first step's optimizer update and the
    # 40 GB training checkpoint the run would write is of no use here
    out = tmp_path / "run"
    kill_at_random_step(stage_args("sft", ckpt, out, *RUN), out, 3, 3)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    peak = max(r["peak_gib"] for r in rows)
    plan = json.loads(run_python("-m", "gptoss_nemo", "plan", str(RECIPE["sft"]),
                                 f"checkpoint={ckpt}", *RUN, "--world-size", "1", *IMPL_ARGS
                                 ).stdout.strip().splitlines()[-1])
    result("planner vs measured peak memory (gpt-oss-20b widths, 2 layers, 1 GPU, seq 4096, micro-batch 1)",
           {"planned_gib": plan["per_gpu_gib"], "measured_peak_gib": peak,
            "ratio": plan["per_gpu_gib"]["total"] / peak, "step_seconds": [r["seconds"] for r in rows],
            "tokens_per_s_per_gpu": [r["tokens_per_s_per_gpu"] for r in rows]})
    assert abs(plan["per_gpu_gib"]["total"] / peak - 1) <= 0.2, (plan, peak)


def test_planner_within_10_percent_with_memory_savers():
    """benchmarks/train_step.py's memory-saver rows (gpt-oss-20b widths, 2 layers, one GPU, sequence 8192, two
    micro-batches): each row's measured peak against the planner's estimate for the same run, and its step time
    against the plain row of its implementation (the rows go to benchmarks/RESULTS.md)."""
    import sys
    from pathlib import Path

    from gptoss_nemo.model.impl import te_problem

    bench = Path(__file__).parents[2] / "benchmarks" / "train_step.py"
    sys.path.insert(0, str(bench.parent))
    from train_step import MEMORY_VARIANTS

    import os

    wanted = os.environ.get("GPU_TESTS_SAVER_VARIANTS", " ".join(MEMORY_VARIANTS)).split()
    variants = [v for v in wanted if te_problem() is None or not v.startswith("te")]
    r = run_python(str(bench), "--suite", "--variants", *variants, "--seq", "8192", "--steps", "3", "--warmup", "2",
                   "--micro-batches", "2", "--timeout", "150", timeout=590)
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{"impl"') or x.startswith('{"error"')]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    result("memory savers: planner vs measured peak, step time vs the plain row (20b widths, 2 layers, seq 8192)",
           {"rows": [{k: row.get(k) for k in ("key", "step_s", "peak_gib", "planned_over_peak", "error")}
                     for row in rows], "summary": summary})
    assert len(rows) == len(variants) and not [row for row in rows if "error" in row], rows
    for row in rows:
        assert abs(row["planned_over_peak"] - 1) <= 0.10, row
