"""Training bookkeeping on CPU: the FLOPs formula, expert-load summaries and warnings, checkpoint directories."""

import pytest
import torch

from gptoss_nemo.checkpoint.writer import atomic_dir
from gptoss_nemo.model.param_count import count_parameters
from gptoss_nemo.model.presets import gpt_oss_20b, gpt_oss_120b, tiny
from gptoss_nemo.train import checkpoint_dirs as ckd
from gptoss_nemo.train.expert_load import summarize, warnings
from gptoss_nemo.train.flops import forward_flops_per_token, mean_context, train_flops_per_token


def test_mean_context():
    assert mean_context(4, None) == 2.5  # (1 + 2 + 3 + 4) / 4
    assert mean_context(4, 2) == (1 + 2 + 2 + 2) / 4
    assert mean_context(4, 8) == 2.5


@pytest.mark.parametrize("make", [tiny, gpt_oss_20b, gpt_oss_120b])
def test_flops_are_twice_the_active_matmul_parameters_plus_attention(make):
    cfg = make()
    pc = count_parameters(cfg)
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    # active parameters minus what is not a matmul weight: biases, norms, sinks, the final norm
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    non_matmul = layers * ((q + 2 * kv + h) + cfg.num_attention_heads + cfg.num_local_experts + 2 * h
                           + cfg.num_experts_per_tok * (2 * cfg.intermediate_size + h)) + h
    matmul_active = pc.active - non_matmul
    no_attention = forward_flops_per_token(cfg, seq_length=1) - 4 * cfg.num_attention_heads * cfg.head_dim * layers
    assert no_attention == 2 * matmul_active
    assert train_flops_per_token(cfg, 4096) == 3 * forward_flops_per_token(cfg, 4096)


def test_20b_flops_order_of_magnitude():
    # 3.6B active -> ~6 * 3.6e9 = 2.2e10 per training token, plus attention at 4k context
    f = train_flops_per_token(gpt_oss_20b(), 4096)
    assert 2.0e10 < f < 2.6e10


def test_expert_load_summary_and_warnings():
    tokens = torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0], [25, 5, 5, 5]])
    loads = summarize(tokens)
    assert loads[0].max_over_mean == 1.0 and loads[0].unused == ()
    assert loads[1].unused == (1, 2, 3) and loads[1].max_share == 1.0
    assert loads[2].max_over_mean == 2.5 and loads[2].max_share == 0.625
    assert warnings(loads, max_share=0.5) == [
        "layer 1: experts [1, 2, 3] received no tokens",
        "layer 1: one expert took 100.0% of the routed tokens (> train.expert_max_share=50%)",
        "layer 2: one expert took 62.5% of the routed tokens (> train.expert_max_share=50%)",
    ]


def _save(root, step):
    with atomic_dir(ckd.step_dir(root, step)) as tmp:
        (tmp / "weights").write_text(str(step))


def test_checkpoint_latest_keep_last_and_torn_writes(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckd.find_latest(root) is None
    for step in (100, 200, 300):
        _save(root, step)
        ckd.mark_latest(root, step, keep_last=2)
    assert ckd.complete_steps(root) == [200, 300] and ckd.find_latest(root) == 300
    # a save that dies mid-write leaves no step directory, and the latest stays 300
    with pytest.raises(RuntimeError):
        with atomic_dir(ckd.step_dir(root, 400)) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert ckd.find_latest(root) == 300
    # renamed but `latest` not yet updated (killed in between): the newest complete one wins
    _save(root, 400)
    assert (root / "latest").read_text().strip() == "step_0000300" and ckd.find_latest(root) == 400
    assert ckd.mark_latest(root, 400, keep_last=2) == [200]


def _seqs(n, length=8):
    from gptoss_nemo.data.packing import Document, pack

    return pack([Document(ids=[i] * length, loss=[True] * length) for i in range(n)], length, pad_id=0)


def test_global_batches_split_over_data_parallel_ranks_and_resume():
    from gptoss_nemo.errors import ConfigError
    from gptoss_nemo.train.batches import GlobalBatches

    seqs = _seqs(10)
    one = GlobalBatches(seqs, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seed=7)
    two = [GlobalBatches(seqs, 4, 1, dp_rank=r, dp_size=2, seed=7) for r in range(2)]
    assert one.num_microbatches == 2 and two[0].num_microbatches == 2
    for step in range(6):  # past an epoch boundary (10 sequences, 4 per step)
        whole = torch.cat([mb["tokens"][:, 0] for mb in one.microbatches(step)]).tolist()
        split = [torch.cat([mb["tokens"][:, 0] for mb in g.microbatches(step)]).tolist() for g in two]
        assert sorted(whole) == sorted(split[0] + split[1])  # the same global batch, whatever dp is
    # an epoch uses every sequence once; a resumed run (fresh object) sees the same batch for the same step
    epoch = [i for step in range(5) for i in one.global_indices(step)][:10]
    assert sorted(epoch) == list(range(10))
    fresh = GlobalBatches(seqs, 4, 2, 0, 1, seed=7)
    assert fresh.global_indices(4) == one.global_indices(4) and one.global_indices(3) != one.global_indices(4)
    with pytest.raises(ConfigError, match="global_batch_size=6 is not a multiple of train.micro_batch_size=2 x "
                                          "data-parallel size 2"):
        GlobalBatches(seqs, 6, 2, 0, 2, seed=7)


def test_metrics_log_and_plots(tmp_path):
    from PIL import Image

    from gptoss_nemo.train.metrics_log import MetricsLog, read_metrics
    from gptoss_nemo.train.plots import plot_expert_load, plot_losses

    log = MetricsLog(tmp_path, tensorboard=True)
    for step in range(1, 6):
        log.log(step, {"lm_loss": 3.0 / step, "aux_loss": 1.0 + 0.01 * step, "grad_norm": float("nan"),
                       "update_ok": True, **({"val_loss": 2.0} if step == 5 else {})})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["val_loss"] == 2.0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    curves = plot_losses(rows, tmp_path / "loss.png")
    heat = plot_expert_load(torch.tensor([[10, 0, 5, 5], [1, 1, 1, 17]]), tmp_path / "experts.png")
    for png in (curves, heat):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] >= 400


STOP = """
import sys
from pathlib import Path
import torch.distributed as dist
from gptoss_nemo.train.stop import stop_requested
rank, stop, port = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
seen = [stop_requested(stop, "cpu")]
if rank == 0:
    stop.touch()
dist.barrier()
seen.append(stop_requested(stop, "cpu"))
seen.append(stop_requested(None, "cpu"))
print(seen, flush=True)
dist.barrier()
dist.destroy_process_group()  # exiting with a live gloo group can abort ("terminate called ...")
"""


def test_stop_request_reaches_every_rank_from_rank_0(tmp_path):
    import subprocess
    import sys

    from gptoss_nemo.parallel.setup import _free_port

    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", STOP, str(r), str(tmp_path / "STOP"), port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-1000:] for _, e in outs)
    assert [o.strip() for o, _ in outs] == ["[False, True, False]"] * 2
