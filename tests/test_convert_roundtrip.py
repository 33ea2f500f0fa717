"""HF -> per-rank megatron state -> HF on CPU, for several layouts: names, shard shapes, bit-identical round trips,
and the distributed gather over a gloo world with data-parallel replicas."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from gptoss_nemo.checkpoint.hf_layout import read_tensors
from gptoss_nemo.convert.hf_reader import HFReader
from gptoss_nemo.convert.hf_to_megatron import iter_rank_state, load_rank_state
from gptoss_nemo.convert.mapping import megatron_param_names
from gptoss_nemo.convert.megatron_to_hf import embedding_to_hf, final_to_hf, layer_to_hf
from gptoss_nemo.errors import CheckpointError
from gptoss_nemo.parallel.layout import ParallelLayout

LAYOUTS = [ParallelLayout(), ParallelLayout(tp=2), ParallelLayout(ep=4), ParallelLayout(pp=4),
           ParallelLayout(tp=2, ep=2, pp=2)]


def rank_states(ckpt, layout, te=False):
    """(tp, ep, pp) -> that rank's megatron state."""
    reader = HFReader(ckpt)
    return {(t, e, s): dict(iter_rank_state(reader, layout, tp_rank=t, ep_rank=e, pp_rank=s, te=te))
            for t in range(layout.tp) for e in range(layout.ep) for s in range(layout.pp)}


def assemble(cfg, layout, states, te=False) -> dict[str, torch.Tensor]:
    """What gather_hf_tensors computes on rank 0, without the transport."""
    per_stage = cfg.num_hidden_layers // layout.pp

    def layer_pieces(stage, n, experts: bool):
        p = f"decoder.layers.{n}."
        keys = [(t, 0) for t in range(layout.tp)] if not experts else [(0, e) for e in range(layout.ep)]
        return [{k[len(p):]: v for k, v in states[(t, e, stage)].items()
                 if k.startswith(p) and (".mlp.experts." in k) == experts} for t, e in keys]

    def only(state, names):
        return {k: state[k] for k in names}

    emb, final = ["embedding.word_embeddings.weight"], ["decoder.final_layernorm.weight", "output_layer.weight"]
    out = embedding_to_hf([only(states[(t, 0, 0)], emb) for t in range(layout.tp)])
    for layer in range(cfg.num_hidden_layers):
        stage, n = divmod(layer, per_stage)
        out.update(layer_to_hf(cfg, layer, layer_pieces(stage, n, False), layer_pieces(stage, n, True), te))
    out.update(final_to_hf([only(states[(t, 0, layout.pp - 1)], final) for t in range(layout.tp)]))
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lo: f"tp{lo.tp}ep{lo.ep}pp{lo.pp}")
@pytest.mark.parametrize("te", [False, True], ids=["local", "te"])
def test_rank_state_names_and_shapes(tiny_mxfp4, layout, te):
    reader = HFReader(tiny_mxfp4)
    cfg = reader.cfg
    d, groups, per_group = cfg.head_dim, cfg.num_key_value_heads // layout.tp, cfg.num_attention_heads // cfg.num_key_value_heads
    for (t, e, s), state in rank_states(tiny_mxfp4, layout, te).items():
        own = layout.owned(cfg, ep_rank=e, pp_rank=s)
        assert set(state) == megatron_param_names(own, te, s == 0, s == layout.pp - 1)
        assert state["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (groups * (per_group + 2) * d,
                                                                                    cfg.hidden_size)
        assert state["decoder.layers.0.self_attention.linear_proj.weight"].shape == (cfg.hidden_size,
                                                                                     groups * per_group * d)
        assert state["decoder.layers.0.self_attention.core_attention.softmax_offset"].shape == (groups * per_group,)
        if s == 0:
            assert state["embedding.word_embeddings.weight"].shape == (cfg.vocab_size // layout.tp, cfg.hidden_size)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lo: f"tp{lo.tp}ep{lo.ep}pp{lo.pp}")
def test_round_trip_is_bit_identical(tiny_bf16, tiny_mxfp4, layout):
    """BF16 -> megatron shards -> BF16 returns every tensor bit for bit; MXFP4 -> ... -> BF16 equals the
    BF16 checkpoint of the same seed (= transformers' dequantization, tests/test_tiny_checkpoint.py)."""
    original = read_tensors(tiny_bf16)
    cfg = HFReader(tiny_bf16).cfg
    for src in (tiny_bf16, tiny_mxfp4):
        back = assemble(cfg, layout, rank_states(src, layout))
        assert list(back) == list(original)  # same names, checkpoint order
        for name, t in original.items():
            assert back[name].dtype == t.dtype and torch.equal(back[name], t), (src.name, name)


def test_shard_slices_hold_the_right_heads(tiny_bf16):
    """TP rank 1's fused QKV is built from query heads 4..7 and kv group 1 only."""
    reader = HFReader(tiny_bf16)
    cfg = reader.cfg
    state = dict(iter_rank_state(reader, ParallelLayout(tp=2), tp_rank=1, ep_rank=0, pp_rank=0))
    d = cfg.head_dim
    q = reader.read("model.layers.0.self_attn.q_proj.weight")
    k = reader.read("model.layers.0.self_attn.k_proj.weight")
    fused = state["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(fused[: 4 * d], q[4 * d: 8 * d]) and torch.equal(fused[4 * d: 5 * d], k[d: 2 * d])
    o = reader.read("model.layers.0.self_attn.o_proj.weight")
    assert torch.equal(state["decoder.layers.0.self_attention.linear_proj.weight"], o[:, 4 * d: 8 * d])


def test_diverged_replicas_are_refused(tiny_bf16):
    layout = ParallelLayout(tp=2)
    states = rank_states(tiny_bf16, layout)
    name = "decoder.layers.2.pre_mlp_layernorm.weight"
    states[(1, 0, 0)][name] = states[(1, 0, 0)][name] + 1  # (reads may share the mmap: no in-place edit)
    with pytest.raises(CheckpointError, match="pre_mlp_layernorm.weight differs between tensor-parallel ranks 0 and 1"):
        assemble(HFReader(tiny_bf16).cfg, layout, states)


def test_load_rank_state_checks_names_and_shapes():
    model = torch.nn.Module()
    model.a, model.b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    load_rank_state(model, [("a", torch.ones(2)), ("b", torch.ones(3))])
    assert model.a.sum() == 2 and model.b.sum() == 3
    with pytest.raises(CheckpointError, match="c is not a parameter of this model stage"):
        load_rank_state(model, [("a", torch.ones(2)), ("c", torch.ones(3))])
    with pytest.raises(CheckpointError, match=r"b is \(4,\) in the checkpoint, \(3,\) in the model"):
        load_rank_state(model, [("b", torch.ones(4))])
    with pytest.raises(CheckpointError, match="no mapping filled b"):
        load_rank_state(model, [("a", torch.ones(2))])


GATHER = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from pathlib import Path
    from gptoss_nemo.convert.hf_reader import HFReader
    from gptoss_nemo.convert.hf_to_megatron import iter_rank_state, load_rank_state
    from gptoss_nemo.convert.megatron_to_hf import gather_hf_tensors
    from gptoss_nemo.parallel.layout import ParallelLayout
    from gptoss_nemo.parallel.setup import RankCoords
    rank, world, ckpt, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method="tcp://127.0.0.1:" + sys.argv[5])
    layout = ParallelLayout(tp=2, ep=2, pp=2)
    # megatron's rank order (tp fastest, then dp, then pp; experts: ep fastest, then edp), for ETP=1
    per_stage = world // layout.pp
    pp, r = divmod(rank, per_stage)
    me = RankCoords(rank=rank, tp=r % layout.tp, pp=pp, dp=r // layout.tp, ep=r % layout.ep, edp=r // layout.ep)
    coords = [None] * world
    dist.all_gather_object(coords, me)
    reader = HFReader(ckpt)
    local = dict(iter_rank_state(reader, layout, tp_rank=me.tp, ep_rank=me.ep, pp_rank=me.pp))
    if sys.argv[6] == "consumer-fails":  # rank 0's writer dies after a few tensors: nobody may hang
        try:
            for k, _ in enumerate(gather_hf_tensors(local, reader.cfg, layout, me, coords)):
                if rank == 0 and k == 5:
                    raise OSError("No space left on device")
        except Exception as e:
            print(f"rank {rank}: {type(e).__name__}: {e}", flush=True)
            os._exit(3)  # skip gloo's teardown, which aborts once peers are gone
    got = dict(gather_hf_tensors(local, reader.cfg, layout, me, coords))
    if rank == 0:
        from safetensors.torch import save_file
        save_file(got, out)
    else:
        assert not got
    dist.barrier()
    dist.destroy_process_group()  # exiting with a live gloo group can abort ("terminate called ...")
""")


def _gather(tiny_bf16, out, port, mode="ok"):
    world = 8
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", GATHER, str(r), str(world), str(tiny_bf16), str(out), port, mode],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    return procs, [p.communicate(timeout=300) for p in procs]


def test_gather_over_gloo_with_replicas(tiny_bf16, tmp_path):
    """8 ranks = TP2 x EP2 x PP2 with a data-parallel replica of each: rank 0 rebuilds the checkpoint."""
    out = tmp_path / "gathered.safetensors"
    procs, outs = _gather(tiny_bf16, out, "29641")
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-1500:] for _, e in outs)
    original = read_tensors(tiny_bf16)
    with safe_open(out, "pt") as f:
        assert sorted(f.keys()) == sorted(original)
        for name, t in original.items():
            assert torch.equal(f.get_tensor(name), t), name


def test_a_failing_writer_on_rank_0_stops_every_rank(tiny_bf16, tmp_path):
    procs, outs = _gather(tiny_bf16, tmp_path / "x.safetensors", "29642", mode="consumer-fails")
    assert [p.returncode for p in procs] == [3] * 8, "\n".join(e[-800:] for _, e in outs)
    assert "OSError: No space left on device" in outs[0][0]
    assert all("export stopped: rank 0 stopped writing (its error is in rank 0's log)" in o for o, _ in outs[1:])
