"""GPU tier for the memory savers (issue 23; gptoss_nemo/train/memory_savers.py).

Recompute: the tiny model (4 layers, 8 experts) with and without train.recompute under each implementation, the
fused one on packed documents (their ids go through megatron's checkpoint), in BF16 and under MXFP4 QAT: the loss,
every parameter's gradient and the per-expert routed-token counts are bitwise the plain run's (deterministic
kernels; the plain run repeated is bitwise too). A recomputed block's first forward runs without grad, where
megatron-core's router used an unsorted top-k and so other routing probabilities (compat.py 15): the loss then
came from those and the gradients from the recomputation's.

Optimizer states: 200 SFT steps of the tiny task (the recipe sft_tiny.yaml) with FP32 states and with each lighter
option; the validation loss and the training-loss curve stay within the stated tolerance of the FP32 run, and a run
with BF16 moments killed mid-way resumes onto the uninterrupted run's losses. Needs Transformer Engine (FusedAdam),
whatever the model's implementation. Prints `RESULT ...` lines."""

import statistics

import pytest
import torch

from launch import IMPL, jobs_per_gpu, kill_at_random_step, result, run_many, run_python, stage_args
from parity import relative_difference as rel

from gptoss_nemo.model.impl import te_problem
from gptoss_nemo.train.memory_savers import MemorySavers
from gptoss_nemo.train.metrics_log import read_metrics

pytestmark = pytest.mark.gpu
needs_te = pytest.mark.skipif(te_problem() is not None, reason=f"needs Transformer Engine: {te_problem()}")

SELECTIVE = {"fused": ("moe", "layernorm", "core_attn"), "reference": ("moe", "layernorm", "core_attn"),
             "te": ("moe_act", "layernorm")}


def _savers(mode: str, impl: str) -> MemorySavers:
    if mode == "selective":
        return MemorySavers(recompute="selective", recompute_modules=SELECTIVE[impl])
    if mode == "selective-moe":
        return MemorySavers(recompute="selective", recompute_modules=("moe",))
    if mode == "full-block":
        return MemorySavers(recompute="full", recompute_layers=2)
    return MemorySavers(recompute=mode)


def _build(impl: str, savers: MemorySavers, state=None):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from gptoss_nemo.model.build import build_model, transformer_config
    from gptoss_nemo.model.megatron_config import RouterConfig
    from gptoss_nemo.model.presets import tiny

    hf = tiny()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(1234)
    # deterministic kernels (megatron's MoE scatter included): BF16 atomics otherwise move the hidden states from
    # run to run, enough to flip near-tie routings (seen: 0.1-0.3 relative on the router biases' gradients)
    model = build_model(hf, transformer_config(hf, RouterConfig(), impl=impl, deterministic_mode=True,
                                               **savers.transformer_fields()))
    if state is not None:
        model.load_state_dict(state)
    return hf, model.train()


def _loss_grads_counts(model, hf, impl: str):
    """One forward+backward on 2 x 512 tokens (packed documents under fused): loss, gradients, routed counts."""
    from gptoss_nemo.model.flex_attention import document_ids
    from gptoss_nemo.model.grouped_experts import expert_weight_cache
    from gptoss_nemo.train.expert_load import RoutedTokenCounter

    g = torch.Generator(device="cuda").manual_seed(7)
    ids = torch.randint(0, hf.vocab_size, (2, 513), device="cuda", generator=g)
    pos = torch.cat([torch.arange(200), torch.arange(312)]).to("cuda").expand(2, -1).clone()
    mask = document_ids(pos) if impl == "fused" else None
    if impl != "fused":
        pos = torch.arange(512, device="cuda").expand(2, -1)
    counter = getattr(model, "_counter", None) or RoutedTokenCounter(model, hf.num_local_experts)
    model._counter = counter
    counter.counts.zero_()
    model.zero_grad()
    with expert_weight_cache(model):
        loss = model(ids[:, :-1], pos, attention_mask=mask, labels=ids[:, 1:]).float().mean()
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, counter.counts.clone()


@pytest.fixture
def deterministic():
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("quant", [None, "mxfp4"])
@pytest.mark.parametrize("mode", ["selective", "selective-moe", "full", "full-block"])
def test_recompute_gives_the_plain_run_exactly(megatron_parallel, deterministic, mode, quant):
    """Under the tier's implementation ($GPU_TESTS_IMPL): fused, te or reference."""
    impl = IMPL
    if quant and impl == "reference":
        pytest.skip("QAT is tested under fused and te")
    from gptoss_nemo.quantize import modelopt_state

    hf, plain = _build(impl, MemorySavers())
    _, recomputed = _build(impl, _savers(mode, impl), state=plain.state_dict())
    if quant:
        for m in (plain, recomputed):
            modelopt_state.quantize(m, quant)
    l0, g0, c0 = _loss_grads_counts(plain, hf, impl)
    l0b, g0b, c0b = _loss_grads_counts(plain, hf, impl)
    l1, g1, c1 = _loss_grads_counts(recomputed, hf, impl)
    assert set(g1) == set(g0)
    spread = max(rel(g0b[n], g0[n]) for n in g0)
    diff = max(rel(g1[n], g0[n]) for n in g0)
    worst = max(g0, key=lambda n: rel(g1[n], g0[n]))
    bitwise = sum(torch.equal(g1[n], g0[n]) for n in g0)
    result(f"recompute {mode} ({', '.join(_savers(mode, impl).recompute_modules) or 'layers'}) vs none, "
           f"impl={impl}, {quant or 'bf16'}", {
               "loss": [l0, l1], "loss_diff": abs(l1 - l0), "max_grad_rel_diff": diff, "worst_param": worst,
               "plain_run_to_run_spread": spread, "bitwise_equal_grads": f"{bitwise}/{len(g0)}",
               "routed_tokens_equal": bool(torch.equal(c0, c1)),
               "plain_routed_tokens_equal": bool(torch.equal(c0, c0b)),
               "routed_tokens": int(c1.sum().item())})
    assert l0b == l0 and spread == 0, "the plain run is not repeatable: deterministic kernels are off"
    assert l1 == l0 and bitwise == len(g0), (l1 - l0, worst, diff)
    # each token counted once per layer (the no-grad first pass of a recomputed block is not counted)
    assert c1.sum().item() == 2 * 512 * hf.num_experts_per_tok * hf.num_hidden_layers
    assert torch.equal(c1, c0)


STATES = {  # name: overrides; each against "fp32"
    "fp32": (),
    "bf16-moments": ("optimizer.exp_avg_dtype=bf16", "optimizer.exp_avg_sq_dtype=bf16"),
    "bf16-moments-grads": ("optimizer.exp_avg_dtype=bf16", "optimizer.exp_avg_sq_dtype=bf16",
                           "optimizer.main_grads_dtype=bf16"),
    "fp16-main-params": ("optimizer.main_params_dtype=fp16", "optimizer.exp_avg_dtype=bf16",
                         "optimizer.exp_avg_sq_dtype=bf16"),
    "offload-half": ("optimizer.cpu_offload_fraction=0.5",),
}
TOLERANCE = 0.03  # final validation loss, and the training-loss curve's mean |difference|, relative to FP32's


@needs_te
def test_lighter_optimizer_states_over_200_tiny_steps(imported_tiny, tmp_path):
    common = ("train.steps=200", "train.eval_every=100", "train.save_every=200", "train.plots=false",
              "train.seed=1234")
    names = list(STATES)
    jobs = [stage_args("sft", imported_tiny, tmp_path / n, *common, *STATES[n]) for n in names]
    run_many(jobs, timeout=900)
    runs = {n: [r for r in read_metrics(tmp_path / n / "metrics.jsonl") if r["step"] > 0] for n in names}
    base = runs["fp32"]
    base_mean = statistics.mean(r["lm_loss"] for r in base)
    report = {}
    for n, rows in runs.items():
        assert [r["step"] for r in rows] == list(range(1, 201)), n
        curve = statistics.mean(abs(a["lm_loss"] - b["lm_loss"]) for a, b in zip(rows, base)) / base_mean
        val = rows[-1]["val_loss"] / base[-1]["val_loss"] - 1
        report[n] = {"val_loss_200": round(rows[-1]["val_loss"], 5), "val_loss_rel_diff": round(val, 4),
                     "curve_mean_abs_rel_diff": round(curve, 4),
                     "step_s_median": round(statistics.median(r["seconds"] for r in rows[10:]), 4),
                     "peak_gib": round(max(r["peak_gib"] for r in rows), 3)}
    result(f"lighter optimizer states, 200 tiny SFT steps (impl={IMPL}, {jobs_per_gpu()} runs per GPU at once)",
           report)
    for n, r in report.items():
        assert abs(r["val_loss_rel_diff"]) <= TOLERANCE and r["curve_mean_abs_rel_diff"] <= TOLERANCE, (n, r)


@needs_te
@pytest.mark.parametrize("states", ["bf16-moments", "offload-half"])
def test_lighter_optimizer_states_resume(states, imported_tiny, tmp_path):
    """SIGKILL mid-run, the same command again: it resumes from the last checkpoint (the optimizer's lighter
    states restored) onto the uninterrupted run's losses (deterministic mode)."""
    common = ("train.steps=20", "optimizer.warmup_steps=19", "train.eval_every=0", "train.save_every=5",
              "train.plots=false", "train.deterministic=true", "train.keep_last=10", *STATES[states])
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    run_python(*stage_args("sft", imported_tiny, ref_out, *common), timeout=300)
    ref = {r["step"]: r["lm_loss"] for r in read_metrics(ref_out / "metrics.jsonl") if r["step"] > 0}
    args = stage_args("sft", imported_tiny, out, *common)
    _, killed_after = kill_at_random_step(args, out, 7, 18)
    run_python(*args, timeout=300)
    rows = {r["step"]: r["lm_loss"] for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0}
    diffs = {s: abs(rows[s] - ref[s]) for s in rows}
    result(f"{states}: SIGKILL + resume (deterministic mode, impl={IMPL})",
           {"killed_after_step": killed_after, "bitwise_equal_steps": sum(d == 0 for d in diffs.values()),
            "steps": len(diffs), "max_abs_difference": max(diffs.values())})
    assert sorted(rows) == list(range(1, 21))
    assert max(diffs.values()) <= 1e-4, diffs
