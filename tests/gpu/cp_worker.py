"""Run under torchrun by tests/gpu/test_context_parallel_gpu.py: one global batch of the tiny gpt-oss under TE's
spec at context-parallel size --cp, through the training step's own code (train/step.py: each CP rank's share of
every sequence, the per-token loss, megatron's schedule, DDP's main gradients), then the gradients reduced as
megatron's finalize_model_grads does with the per-token loss: summed over the data x context-parallel ranks (the
experts over theirs), divided by the global batch's loss tokens. Writes to --out: result.json (the loss, and the
tokens each expert of each layer was routed), grads.pt (rank 0, FP32) and logits_cp{rank}.pt (each rank's share of
a forward without labels, BF16 as the output layer computed them, with the positions it holds).

With fewer GPUs than ranks (one lent GPU, CP2) every rank runs on GPU 0 over a gloo process group: TE's all-to-all
and all-gather and megatron's all-reduces then go through host memory. Each rank computes what it would over NCCL.
The gradient reduction here is one all-reduce per parameter (gloo has no coalesced CUDA all-reduce, which DDP's
own grad sync would use)."""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module

from gptoss_nemo.compat import apply_megatron_patches
from gptoss_nemo.convert.hf_reader import HFReader
from gptoss_nemo.convert.hf_to_megatron import iter_rank_state, load_rank_state
from gptoss_nemo.data.packing import Sequence
from gptoss_nemo.model.build import build_rank_model
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.megatron_config import RouterConfig
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.parallel.setup import init_distributed, shutdown
from gptoss_nemo.train.batches import GlobalBatches
from gptoss_nemo.train.expert_load import RoutedTokenCounter
from gptoss_nemo.train.step import (
    context_parallel_share,
    experts_in_their_own_optimizer,
    global_mean,
    model_inputs,
    run_global_batch,
)

p = argparse.ArgumentParser()
p.add_argument("--cp", type=int, required=True)
p.add_argument("--hf", required=True, help="the tiny HF checkpoint")
p.add_argument("--seq", type=int, default=1024)
p.add_argument("--batch", type=int, default=2, help="sequences in the global batch")
p.add_argument("--micro-batch", type=int, default=2)
p.add_argument("--out", required=True)
p.add_argument("--skip-patches", default="", help="workarounds left out (compat.py names, comma-separated)")
args = p.parse_args()
if args.skip_patches:
    os.environ["GPTOSS_NEMO_SKIP_PATCHES"] = args.skip_patches


def sequences(cfg: GptOssConfig, n: int, seq: int) -> list[Sequence]:
    """n single-document sequences as data.packing=false makes them: a document of random tokens (longer than the
    sliding window), its first tokens a prompt without loss, then padding (position 0, no loss)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        length = seq - 160 * i  # the first fills the sequence, the others end in padding
        ids = torch.randint(0, cfg.vocab_size - 1000, (seq + 1,), generator=gen)
        ids[length:] = 0
        loss = torch.zeros(seq)
        loss[32 + 8 * i:length - 1] = 1.0
        position = torch.zeros(seq, dtype=torch.long)
        position[:length] = torch.arange(length)
        out.append(Sequence(tokens=ids[:-1].clone(), labels=ids[1:].clone(), loss_mask=loss, position_ids=position,
                            cu_seqlens=torch.tensor([0, length], dtype=torch.int32)))
    return out


world = int(os.environ.get("WORLD_SIZE", "1"))
shared_gpu = torch.cuda.device_count() < world
if shared_gpu:
    os.environ["LOCAL_RANK"] = "0"
    torch.cuda.set_device(0)
    dist.init_process_group("gloo")
layout = ParallelLayout(cp=args.cp)
me = init_distributed(layout)

cfg = GptOssConfig.from_file(args.hf)
gpt = build_rank_model(cfg, layout, RouterConfig(), impl="te", calculate_per_token_loss=True)
load_rank_state(gpt, iter_rank_state(HFReader(args.hf), layout, tp_rank=0, ep_rank=0, pp_rank=0, te=True))
experts_in_their_own_optimizer(gpt)
model = DistributedDataParallel(
    gpt.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False,
                                              overlap_grad_reduce=False), Float16Module(gpt.config, gpt))
batches = GlobalBatches(sequences(cfg, args.batch, args.seq), args.batch, args.micro_batch, 0, 1, seed=0)

counter = RoutedTokenCounter(gpt, cfg.num_local_experts)
totals = run_global_batch(model, batches, 0, args.seq, forward_only=False)
loss, tokens = global_mean(totals)
routed = counter.take()  # [layers, experts], summed over the CP ranks
grads = {}
for name, param in gpt.named_parameters():
    g = param.main_grad.detach().clone().float()
    expert = not getattr(param, "allreduce", True)
    dist.all_reduce(g, group=ps.get_expert_data_parallel_group() if expert
                    else ps.get_data_parallel_group(with_context_parallel=True))
    grads[name] = (g / tokens).cpu()

cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
with torch.no_grad():
    shares = []
    for micro in batches.microbatches(0):
        mine = context_parallel_share({**micro, "index": torch.arange(args.seq).expand_as(micro["tokens"])}, cp,
                                      cp_rank)
        batch, documents = model_inputs("te", {k: v for k, v in mine.items() if k != "index"}, "cuda")
        logits = model(batch["tokens"], batch["position_ids"], **documents)
        shares.append((logits.to(torch.bfloat16).cpu(), mine["index"][0]))
torch.save({"logits": torch.cat([s[0] for s in shares]), "positions": shares[0][1]}, out / f"logits_cp{cp_rank}.pt")
if me.rank == 0:
    torch.save(grads, out / "grads.pt")
    (out / "result.json").write_text(json.dumps({
        "cp": cp, "world": dist.get_world_size(), "backend": dist.get_backend(), "shared_gpu": shared_gpu,
        "micro_batch": args.micro_batch, "loss": loss, "loss_tokens": tokens, "routed_tokens": routed.tolist(),
        "patches": apply_megatron_patches()}))  # the names of the workarounds in effect
dist.barrier()
shutdown()
