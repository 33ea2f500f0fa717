"""The memory savers (issue 23) on the CPU: recipe settings and their checks, what megatron is given, and what the
planner counts for each (the GPU tier checks the counts against measured peaks: tests/gpu/test_plan_gpu.py)."""

import pytest

from gptoss_nemo.config.sft import OptimizerConfig, TrainConfig
from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.impl import te_problem
from gptoss_nemo.model.presets import gpt_oss_20b, gpt_oss_120b
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.plan.memory import GIB, estimate, longest_fitting
from gptoss_nemo.train.memory_savers import MemorySavers


@pytest.mark.parametrize("kwargs,words", [
    (dict(recompute="some"), "train.recompute='some'"),
    (dict(recompute="selective", recompute_modules=["mlp"]), "'mlp' is not a gpt-oss module"),
    (dict(recompute="selective", recompute_modules=[]), "name the modules"),
    (dict(recompute="selective", recompute_layers=2), "applies to train.recompute=full"),
    (dict(recompute="full", recompute_layers=0), "must be >= 1"),
])
def test_recompute_settings_are_checked(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs,words", [
    (dict(exp_avg_dtype="int8"), "optimizer.exp_avg_dtype='int8'"),
    (dict(main_params_dtype="bf16"), "main_params_dtype='bf16'; use one of fp32, fp16"),
    (dict(main_grads_dtype="fp16"), "main_grads_dtype='fp16'"),
    (dict(cpu_offload_fraction=1.5), r"in \[0, 1\]"),
    (dict(cpu_offload_fraction=0.5, exp_avg_dtype="bf16"), "keeps FP32 states and would ignore it"),
])
def test_optimizer_state_settings_are_checked(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        OptimizerConfig(**kwargs)


def test_what_megatron_is_given():
    from gptoss_nemo.model.megatron_config import to_transformer_config

    def savers(**train):
        return MemorySavers.of(TrainConfig(**train), OptimizerConfig())

    assert savers().transformer_fields() == {} and savers().optimizer_fields() == {}
    full = savers(recompute="full").transformer_fields()
    assert full == {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    block = savers(recompute="full", recompute_layers=3).transformer_fields()
    assert block["recompute_method"] == "block" and block["recompute_num_layers"] == 3
    sel = savers(recompute="selective", recompute_modules=["moe", "layernorm"]).transformer_fields()
    assert sel == {"recompute_granularity": "selective", "recompute_modules": ["moe", "layernorm"]}
    for impl, fields in (("fused", full), ("fused", block), ("reference", sel)):  # megatron's own checks pass
        cfg = to_transformer_config(gpt_oss_20b().replace(num_hidden_layers=4, layer_types=["full_attention"] * 4),
                                    impl=impl, **fields)
        assert cfg.recompute_granularity == fields["recompute_granularity"]
    # modules only apply to selective: full and none carry none of them
    assert MemorySavers.of(TrainConfig(recompute="full", recompute_modules=["moe"]), OptimizerConfig()
                           ).recompute_modules == ()
    light = MemorySavers.of(TrainConfig(), OptimizerConfig(exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16",
                                                           main_grads_dtype="bf16"))
    opt = light.optimizer_fields()
    assert opt["use_precision_aware_optimizer"] and str(opt["exp_avg_dtype"]) == "torch.bfloat16"
    assert not opt["store_param_remainders"] and not light.grad_reduce_in_fp32
    off = MemorySavers.of(TrainConfig(), OptimizerConfig(cpu_offload_fraction=0.25)).optimizer_fields()
    assert off["optimizer_cpu_offload"] and off["optimizer_offload_fraction"] == 0.25


TWELVE = gpt_oss_20b().replace(num_hidden_layers=12, layer_types=["full_attention"] * 12)


def test_what_an_implementation_or_this_machine_cannot_run_is_refused():
    with pytest.raises(ConfigError, match="moe_act with model.impl=fused"):
        MemorySavers(recompute="selective", recompute_modules=("moe_act",)).check("fused", TWELVE, ParallelLayout())
    moe_act = MemorySavers(recompute="selective", recompute_modules=("moe_act",))
    moe_act.check("te", TWELVE, ParallelLayout(), here=False)
    with pytest.raises(ConfigError, match="recompute_layers=13 exceeds the 12 layers"):
        MemorySavers(recompute="full", recompute_layers=13).check("fused", TWELVE, ParallelLayout())
    light = MemorySavers(exp_avg_dtype="bf16")
    light.check("fused", TWELVE, ParallelLayout(), here=False)  # planned for the job's container
    if te_problem() is not None:  # this CPU machine has no Transformer Engine
        with pytest.raises(ConfigError, match="need Transformer Engine's FusedAdam"):
            light.check("fused", TWELVE, ParallelLayout())


def test_the_planner_counts_each_saver():
    cfg, layout = gpt_oss_20b(), ParallelLayout(ep=8)

    def plan(**kw):  # torch's AdamW (no TE or Apex installed) unless the savers need TE's
        return estimate(cfg, layout, 8, 16384, 1, impl="fused", savers=MemorySavers(**kw), fused_adam=False)[0]

    plain, full = plan(), plan(recompute="full")
    moe, half = plan(recompute="selective", recompute_modules=("moe",)), plan(recompute="full", recompute_layers=12)
    assert plain.activations > moe.activations > full.activations
    assert plain.activations > half.activations > full.activations
    # full recompute keeps a layer's input per layer (2TH) plus one layer recomputed at a time (and the logits)
    h, t, layers = cfg.hidden_size, 16384, cfg.num_hidden_layers
    logits = 8 * t * cfg.vocab_size
    one_layer = (plain.activations - logits) / layers
    assert full.activations == pytest.approx(logits + layers * 2 * t * h + one_layer)
    bf16 = plan(exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16", main_grads_dtype="bf16")
    assert bf16.optimizer == pytest.approx(plain.optimizer * 8 / 12) and bf16.gradients == plain.gradients / 2
    assert bf16.optimizer_step == 0 and plain.optimizer_step > 0  # TE's FusedAdam has no FP32 temporary
    off = plan(cpu_offload_fraction=0.5)
    assert off.optimizer == pytest.approx(plain.optimizer / 2)


def test_the_planner_finds_longer_sequences_with_savers():
    cfg, layout = gpt_oss_120b(), ParallelLayout(tp=2, ep=8, pp=4)
    plain = longest_fitting(cfg, layout, 32, 1, 80 * GIB, impl="te", qat=True)
    saved = longest_fitting(cfg, layout, 32, 1, 80 * GIB, impl="te", qat=True,
                            savers=MemorySavers(recompute="full", exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16",
                                                main_grads_dtype="bf16"))
    assert saved is not None and (plain or 0) < 8192 <= saved


def test_context_parallel_layouts_are_checked():
    from gptoss_nemo.data.dataset import DataConfig
    from gptoss_nemo.train.sft import check_sequence_split as checked

    cfg = gpt_oss_120b()
    ParallelLayout(tp=2, cp=4, ep=8, pp=4).validate(cfg, 128, te=True)
    assert ParallelLayout(tp=2, cp=4, ep=8, pp=4).data_parallel(128) == 4
    with pytest.raises(ConfigError, match="not divisible by tp\\*cp=16"):
        ParallelLayout(tp=2, cp=8, ep=8, pp=1).validate(cfg, 64, te=True)
    with pytest.raises(ConfigError, match="context parallelism needs Transformer Engine's spec"):
        ParallelLayout(cp=2, ep=8).validate(cfg, 16, te=False)
    with pytest.raises(ConfigError, match="world size 24 is not divisible by tp\\*cp\\*pp=16"):
        ParallelLayout(tp=2, cp=2, pp=4).validate(cfg, 24, te=True)
    fields = ParallelLayout(tp=2, cp=4).megatron_overrides(te=True)
    assert fields["context_parallel_size"] == 4 and fields["cp_comm_type"] == "a2a"
    assert "cp_comm_type" not in ParallelLayout().megatron_overrides(te=True)
    data = lambda **kw: DataConfig(train=["synthetic:arithmetic:10"], **kw)  # noqa: E731
    checked(data(seq_length=8192, packing=False), ParallelLayout(tp=2, cp=4), te=True)
    with pytest.raises(ConfigError, match="not divisible by 2 x parallel.cp=4"):
        checked(data(seq_length=8196, packing=False), ParallelLayout(cp=4), te=True)
    with pytest.raises(ConfigError, match="data.packing=true with parallel.cp > 1"):
        checked(data(seq_length=8192, packing=True), ParallelLayout(cp=4), te=True)
    with pytest.raises(ConfigError, match="data.seq_length=8200 / parallel.cp=4 is not divisible by parallel.tp=4"):
        checked(data(seq_length=8200, packing=False), ParallelLayout(tp=4, cp=4), te=True)


def test_each_context_parallel_rank_takes_two_balanced_chunks():
    """Rank r of cp keeps chunks r and 2cp-1-r of 2cp: together the ranks hold every position once, and each holds
    as many causal-attention pairs as the others (megatron's RoPE slicing assumes this order)."""
    import torch

    from gptoss_nemo.train.step import context_parallel_share

    s, cp = 16, 2
    batch = {"tokens": torch.arange(2 * s).view(2, s), "position_ids": torch.arange(s).expand(2, s)}
    shares = [context_parallel_share(batch, cp, r) for r in range(cp)]
    assert shares[0]["tokens"][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shares[1]["position_ids"][1].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    held = torch.cat([x["position_ids"][0] for x in shares]).sort().values
    assert held.tolist() == list(range(s))
    pairs = [int((x["position_ids"][0] + 1).sum()) for x in shares]  # keys a causal query sees
    assert pairs[0] == pairs[1]
    assert context_parallel_share(batch, 1, 0) is batch


def test_the_planner_divides_activations_over_context_parallel_ranks():
    cfg = gpt_oss_120b()
    one = estimate(cfg, ParallelLayout(tp=2, ep=8, pp=4), 64, 32768, 1, impl="te")[0]
    two = estimate(cfg, ParallelLayout(tp=2, cp=2, ep=8, pp=4), 64, 32768, 1, impl="te")[0]
    assert two.activations == pytest.approx(one.activations / 2, rel=1e-6)
    assert two.optimizer == pytest.approx(one.optimizer)  # dense states sharded over DP x CP = the same ranks


CP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
rank, port = int(sys.argv[1]), sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2)
from megatron.core import parallel_state as ps
ps.initialize_model_parallel(1, 1, context_parallel_size=2)
from megatron.core.utils import get_batch_on_this_cp_rank
from megatron.core.models.common.embeddings import rope_utils
from gptoss_nemo.train.step import context_parallel_share
class _Cpu:
    def __init__(self, t): self.t = t
    def cuda(self, **kw): return self.t
s = 16
batch = {"tokens": torch.arange(2 * s).view(2, s), "labels": torch.arange(2 * s).view(2, s) + 1,
         "loss_mask": torch.ones(2, s), "position_ids": torch.arange(s).expand(2, s).contiguous()}
ours = context_parallel_share(batch, ps.get_context_parallel_world_size(), ps.get_context_parallel_rank())
theirs = get_batch_on_this_cp_rank({k: v.clone() for k, v in batch.items()}, is_hybrid_cp=False,
                                   cp_group=ps.get_context_parallel_group())
assert all(torch.equal(ours[k], theirs[k]) for k in batch), (ours, theirs)
real_tensor = torch.tensor  # megatron builds its 2 chunk indices in pinned memory and moves them to the GPU
rope_utils.torch = type("T", (), {"tensor": staticmethod(lambda data, **kw: _Cpu(real_tensor(data)))})
rope = rope_utils.get_pos_emb_on_this_cp_rank(torch.arange(s, dtype=torch.float32).view(s, 1, 1, 1), 0,
                                              ps.get_context_parallel_group())
assert torch.equal(rope.view(-1).long(), ours["position_ids"][0]), (rope.view(-1), ours["position_ids"][0])
print("cp rank", rank, "ok", ours["position_ids"][0].tolist())
"""


def test_context_parallel_share_is_megatrons_split_and_its_rope_slice():
    """Two gloo processes as CP ranks: each rank's share of a micro-batch equals megatron's own split
    (get_batch_on_this_cp_rank) and the positions megatron's RoPE slices for that rank."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, "-c", CP_SCRIPT, str(r), "29641"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "cp rank 0 ok [0, 1, 2, 3, 12, 13, 14, 15]" in outs[0][0]
    assert "cp rank 1 ok [4, 5, 6, 7, 8, 9, 10, 11]" in outs[1][0]


def test_plan_names_what_to_turn_on_next():
    """`plan`'s ladder: each saver not yet on, then context parallelism while the layout allows it (TE's spec), each
    with a longer sequence than the step before."""
    from gptoss_nemo.plan.memory import further

    cfg, layout = gpt_oss_120b(), ParallelLayout(tp=2, ep=8, pp=4)
    steps = further(cfg, layout, 32, 1, 80 * GIB, impl="te", qat=True)
    names = [s["turn_on"][0] for s in steps]
    assert names == ["train.recompute=full", "optimizer.exp_avg_dtype=bf16", "optimizer.main_grads_dtype=bf16",
                     "parallel.cp=2", "parallel.cp=4"]  # cp 8 would need tp x cp | 8 KV heads: 16 does not
    lengths = [s["longest_seq_length_that_fits"] or 0 for s in steps]
    assert lengths == sorted(lengths) and lengths[0] > 1024
    done = further(cfg, layout, 32, 1, 80 * GIB, impl="fused", qat=True,
                   savers=MemorySavers(recompute="full", exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16",
                                       main_grads_dtype="bf16"))
    assert done == []  # all on, and no context parallelism outside TE's spec


def test_plan_names_a_pipeline_recipes_keys_per_stage(capsys):
    import json
    from pathlib import Path

    from gptoss_nemo.cli import main

    recipe = Path(__file__).parents[1] / "recipes" / "gpt_oss_120b.yaml"
    assert main(["plan", str(recipe), "qat.train.recompute=none", "sft.train.recompute=none", "--world-size", "32",
                 "--model", "gpt-oss-120b", "--no-data"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["to_go_further"][0]["turn_on"] == ["sft.train.recompute=full", "qat.train.recompute=full"]
    assert out["memory_savers"]["exp_avg_dtype"] == "bf16" and out["longest_seq_length_that_fits"] < 8192
