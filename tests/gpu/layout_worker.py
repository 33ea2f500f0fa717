"""Run under torchrun by tests/gpu/test_import_gpu.py: load tiny gpt-oss into megatron under one layout, compare
logits with transformers, optionally export HF BF16. Writes its findings as JSON (rank 0)."""

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from launch import IMPL
from parity import bit_identical, megatron_variants, parity_report, token_ids

from gptoss_nemo.checkpoint.hf_layout import read_tensors
from gptoss_nemo.convert.dist_checkpoint import load_dist_checkpoint
from gptoss_nemo.convert.hf_export import export_hf
from gptoss_nemo.convert.hf_reader import HFReader
from gptoss_nemo.convert.hf_to_megatron import iter_rank_state, load_rank_state
from gptoss_nemo.model.build import build_rank_model
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.parallel.setup import init_distributed, shutdown

p = argparse.ArgumentParser()
p.add_argument("--tp", type=int, default=1)
p.add_argument("--ep", type=int, default=1)
p.add_argument("--pp", type=int, default=1)
p.add_argument("--hf", help="load from this HF checkpoint")
p.add_argument("--dist", help="load from this gptoss-nemo checkpoint instead")
p.add_argument("--reference", required=True, help="BF16 HF checkpoint for transformers and for bit comparisons")
p.add_argument("--export", help="also export HF BF16 here and compare it with --reference")
p.add_argument("--no-parity", action="store_true")
p.add_argument("--out", required=True)
args = p.parse_args()

layout = ParallelLayout(tp=args.tp, ep=args.ep, pp=args.pp)
cfg = GptOssConfig.from_file(args.reference)
me = init_distributed(layout)
model = build_rank_model(cfg, layout, impl=IMPL, parallel_output=False)
result = {"layout": f"tp{layout.tp} ep{layout.ep} pp{layout.pp}", "world": dist.get_world_size(),
          "source": args.hf or args.dist}
if args.hf:
    reader = HFReader(args.hf)
    load_rank_state(model, iter_rank_state(reader, layout, tp_rank=me.tp, ep_rank=me.ep, pp_rank=me.pp,
                                                te=IMPL == "te"))
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, reader.expert_bytes_read / reader.expert_bytes_total())
    result["expert_bytes_share_per_rank"] = shares
else:
    load_dist_checkpoint(model, args.dist)

if not args.no_parity:
    ids = token_ids(cfg.vocab_size)
    logits = megatron_variants(
        model, ids, lambda **kw: build_rank_model(cfg, layout, impl=IMPL, parallel_output=False, **kw))
    findings = [None] * dist.get_world_size()
    mine = None
    if logits[0] is not None and me.tp == 0 and me.dp == 0:
        mine = parity_report(args.reference, ids, *logits)
    dist.all_gather_object(findings, mine)
    result["parity"] = next(f for f in findings if f is not None)

if args.export:
    export_hf(model, cfg, layout, args.export)
    if me.rank == 0:
        result["export_vs_reference"] = bit_identical(read_tensors(args.export), read_tensors(args.reference))

if me.rank == 0:
    Path(args.out).write_text(json.dumps(result, indent=2))
dist.barrier()
shutdown()
