"""`gptoss-nemo import`: a Hugging Face gpt-oss checkpoint -> a megatron distributed checkpoint.

Every input is checked before a GPU is touched (checkpoint headers and config, the layout against the world
size, the output directory). Each rank then reads only the slices it owns, loads them into its model stage,
and the ranks save one distributed checkpoint together. The layout used here is only how the import is
spread; later stages load the checkpoint under any other layout.
"""

from __future__ import annotations

from pathlib import Path

from gptoss_nemo.checkpoint.hf_layout import checkpoint_bytes
from gptoss_nemo.checkpoint.writer import check_target
from gptoss_nemo.convert.dist_checkpoint import save_dist_checkpoint
from gptoss_nemo.convert.hf_reader import HFReader
from gptoss_nemo.convert.hf_to_megatron import iter_rank_state, load_rank_state
from gptoss_nemo.model.impl import ModelImpl, resolve_impl
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.parallel.setup import env_world_size


def run_import(hf_dir: str | Path, out_dir: str | Path, layout: ParallelLayout, *, overwrite: bool = False,
               impl: str | ModelImpl = "auto") -> dict:
    """Returns (on every rank) a summary with the expert bytes each rank read."""
    hf_dir = Path(hf_dir)
    reader = HFReader(hf_dir)  # validates config and every tensor header; reads no tensor data yet
    cfg = reader.cfg
    impl = resolve_impl(impl, layout=layout)
    layout.validate(cfg, env_world_size(), te=impl.te, training=False)
    check_target(out_dir, overwrite, nbytes=checkpoint_bytes(cfg, quantized=False))  # BF16, every rank's part

    import torch.distributed as dist

    from gptoss_nemo.model.build import build_rank_model
    from gptoss_nemo.parallel.setup import init_distributed

    me = init_distributed(layout)
    model = build_rank_model(cfg, layout, impl=impl)
    state = iter_rank_state(reader, layout, tp_rank=me.tp, ep_rank=me.ep, pp_rank=me.pp,
                            te=bool(model.config.moe_grouped_gemm))
    load_rank_state(model, state, where=f"import {hf_dir}")
    save_dist_checkpoint(model, out_dir, cfg, layout=layout, source=str(hf_dir.resolve()), side_files_from=hf_dir,
                         overwrite=overwrite)
    reads: list = [None] * dist.get_world_size()
    dist.all_gather_object(reads, (me.rank, reader.expert_bytes_read, reader.bytes_read))
    total = reader.expert_bytes_total()
    return {
        "out": str(out_dir),
        "layout": {"tp": layout.tp, "ep": layout.ep, "pp": layout.pp},
        "world_size": dist.get_world_size(),
        "expert_bytes_total": total,
        "expert_bytes_read_per_rank": [r[1] for r in sorted(reads)],
        "max_expert_share_per_rank": max(r[1] for r in reads) / total,
        "bytes_read_per_rank": [r[2] for r in sorted(reads)],
    }
