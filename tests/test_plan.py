"""The memory planner: parameter shards add up to the model, optimizer states shard over data parallelism."""

import pytest

from gptoss_nemo.model.param_count import count_parameters
from gptoss_nemo.model.presets import gpt_oss_20b, gpt_oss_120b, tiny
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.plan.memory import GIB, estimate, rank_params


@pytest.mark.parametrize("make", [tiny, gpt_oss_20b, gpt_oss_120b])
@pytest.mark.parametrize("layout", [ParallelLayout(), ParallelLayout(tp=2, ep=4, pp=2), ParallelLayout(ep=8, pp=4)],
                         ids=lambda lo: f"tp{lo.tp}ep{lo.ep}pp{lo.pp}")
def test_rank_shards_add_up_to_the_model(make, layout):
    """Summing every (tp, ep, stage) shard once, replicated tensors counted once, gives the model's parameters."""
    cfg = make()
    if cfg.num_local_experts % layout.ep or cfg.num_hidden_layers % layout.pp or cfg.num_key_value_heads % layout.tp:
        pytest.skip("layout does not divide this model")
    h = cfg.hidden_size
    replicated_per_layer = h + cfg.num_local_experts * (h + 1) + 2 * h  # o_proj bias, router, norms
    total = 0
    for stage in range(layout.pp):
        p = rank_params(cfg, layout, stage)
        layers = cfg.num_hidden_layers // layout.pp
        dense_split = p.dense - layers * replicated_per_layer - (h if stage == layout.pp - 1 else 0)
        total += layout.tp * dense_split + layers * replicated_per_layer + (h if stage == layout.pp - 1 else 0)
        total += layout.ep * p.expert
    assert total == count_parameters(cfg).total


def test_120b_optimizer_states_shard_over_data_parallel_ranks():
    cfg = gpt_oss_120b()
    one_node, _ = estimate(cfg, ParallelLayout(ep=8), world_size=8, seq_length=4096, micro_batch=1)
    four_nodes, _ = estimate(cfg, ParallelLayout(ep=8), world_size=32, seq_length=4096, micro_batch=1)
    # EP8 on one node: ~14.6B parameters per GPU at 2 + 4 + 12 bytes each, far beyond 80 GB
    assert one_node.total / GIB > 200
    # four nodes: the same shards per GPU, the expert optimizer states over 4 expert-data-parallel ranks
    assert four_nodes.weights == one_node.weights and four_nodes.gradients == one_node.gradients
    assert four_nodes.optimizer == pytest.approx(one_node.optimizer / 4, rel=0.02)
    deep, stage = estimate(cfg, ParallelLayout(ep=8, pp=4), world_size=32, seq_length=4096, micro_batch=1)
    assert deep.weights < one_node.weights / 3 and stage == 0  # the first stage: embedding + most in flight


def test_local_attention_pays_for_the_score_matrix():
    """megatron's reference attention keeps BF16 scores and probabilities (4 bytes per score) in every layer and
    an FP32 copy and softmax (8 bytes) in the running one; the fused local kernels and TE keep none, the fused
    ones a stacked copy of the expert weights and 2 more bytes per logit instead; the optimizer's temporary does
    not add to activations."""
    cfg = gpt_oss_20b()
    te, _ = estimate(cfg, ParallelLayout(), 1, seq_length=4096, micro_batch=1, impl="te")
    local, _ = estimate(cfg, ParallelLayout(), 1, seq_length=4096, micro_batch=1, impl="reference", fused_adam=False)
    fused, _ = estimate(cfg, ParallelLayout(), 1, seq_length=4096, micro_batch=1, impl="fused")
    scores = cfg.num_attention_heads * 4096**2
    assert local.activations - te.activations == (cfg.num_hidden_layers * 4 + 8) * scores
    from gptoss_nemo.model.param_count import count_parameters

    experts = cfg.num_hidden_layers * cfg.num_local_experts * count_parameters(cfg).per_expert
    # the fused loss keeps 8 bytes per logit, megatron's 6
    assert fused.activations - te.activations == 2 * 4096 * cfg.vocab_size and fused.quantization == 2 * experts
    assert local.total == local.weights + local.gradients + local.optimizer + max(
        local.activations, local.optimizer_step)


def test_plan_command(capsys):
    import json
    from pathlib import Path

    from gptoss_nemo.cli import main

    recipe = str(Path(__file__).parent.parent / "recipes" / "sft_tiny.yaml")
    assert main(["plan", recipe, "parallel.ep=8", "--model", "gpt-oss-120b", "--world-size", "8"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["fits"] is False and report["per_gpu_gib"]["total"] > 80
    longest = report["longest_seq_length_that_fits"]
    assert "exceeds 80.0 GiB per GPU" in out.err and (f"data.seq_length <= {longest} fits" in out.err if longest
                                                       else "not even 1024 tokens fit" in out.err)
    assert main(["plan", recipe, "parallel.ep=3", "--model", "gpt-oss-120b", "--world-size", "8"]) == 2
    assert "num_local_experts=128 is not divisible by ep=3" in capsys.readouterr().err


def test_longest_fitting_sequence_is_the_boundary():
    """plan's longest_seq_length_that_fits: that length fits the budget, 1024 tokens more do not."""
    from gptoss_nemo.model.presets import gpt_oss_20b
    from gptoss_nemo.parallel.layout import ParallelLayout
    from gptoss_nemo.plan.memory import GIB, estimate, longest_fitting

    cfg, layout = gpt_oss_20b(), ParallelLayout(tp=1, ep=8, pp=1)
    total = lambda seq: estimate(cfg, layout, 8, seq, 1, impl="fused")[0].total  # noqa: E731
    longest = longest_fitting(cfg, layout, 8, 1, 80 * GIB)
    assert longest is not None and longest % 1024 == 0
    assert total(longest) <= 80 * GIB < total(longest + 1024)
    assert longest_fitting(cfg, layout, 8, 1, total(1024) - 1) is None  # not even 1024 tokens
    assert longest_fitting(cfg, layout, 8, 1, 10**15) == cfg.max_position_embeddings  # everything fits
