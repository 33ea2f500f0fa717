"""Where does TP2 go wrong? Run: torchrun --nproc-per-node 2 tests/gpu/tp_diagnose.py HF_BF16_DIR DIST_CKPT
(a tiny BF16 checkpoint and the gptoss-nemo checkpoint imported from it). Prints JSON lines on rank 0:
  1. our HF -> TP2 slicing vs megatron's dist-checkpoint resharding, parameter by parameter (bitwise);
  2. per layer, in FP32, the relative error of the attention output, the MoE output and the layer output against
     transformers' GptOssForCausalLM on the same input: the first layer and sub-block that diverge.
"""

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from launch import IMPL

from gptoss_nemo.convert.dist_checkpoint import load_dist_checkpoint
from gptoss_nemo.convert.hf_reader import HFReader
from gptoss_nemo.convert.hf_to_megatron import iter_rank_state, load_rank_state
from gptoss_nemo.model.build import build_rank_model
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.parallel.setup import init_distributed, shutdown

hf_dir, dist_dir = sys.argv[1], sys.argv[2]
layout = ParallelLayout(tp=2)
cfg = GptOssConfig.from_file(hf_dir)
me = init_distributed(layout)
sys.excepthook = lambda *exc: (traceback.print_exception(*exc, file=sys.stdout), sys.stdout.flush(), os._exit(1))


def build():
    return build_rank_model(cfg, layout, impl=IMPL, parallel_output=False, params_dtype=torch.float32).eval()


ours, theirs = build(), build()
load_rank_state(ours, iter_rank_state(HFReader(hf_dir), layout, tp_rank=me.tp, ep_rank=me.ep, pp_rank=me.pp,
                                     te=IMPL == "te"))
load_dist_checkpoint(theirs, dist_dir)
differ = [n for (n, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()) if not torch.equal(a, b)]
all_differ = [None] * 2
dist.all_gather_object(all_differ, differ)
if me.rank == 0:
    print(json.dumps({"slicing_vs_resharding_differ": all_differ}), flush=True)

captured: dict[str, torch.Tensor] = {}


def keep(name, fn):
    return lambda module, inputs, output: captured.__setitem__(name, fn(output).detach().float())


for i, layer in enumerate(ours.decoder.layers):
    layer.self_attention.register_forward_hook(keep(f"attn{i}", lambda o: o[0] + o[1] if o[1] is not None else o[0]))
    layer.mlp.register_forward_hook(keep(f"mlp{i}", lambda o: o[0]))
    layer.register_forward_hook(keep(f"layer{i}", lambda o: o[0]))
ids = torch.randint(0, cfg.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0)).cuda()
pos = torch.arange(256, device="cuda").unsqueeze(0)
with torch.no_grad():
    logits = ours(ids, pos, attention_mask=None).float()

if me.rank == 0:
    from transformers import GptOssForCausalLM

    ref = GptOssForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").cuda().eval()
    want: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(ref.model.layers):
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: want.__setitem__(f"attn{i}", o[0].float()))
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: want.__setitem__(f"mlp{i}", o[0].float()))
        layer.register_forward_hook(
            lambda m, a, o, i=i: want.__setitem__(f"layer{i}", (o[0] if isinstance(o, tuple) else o).float()))
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits.float()
    for key in want:
        got = captured[key].transpose(0, 1).reshape(want[key].shape)  # megatron [s, b, h] -> HF [b, s, h]
        rel = ((got - want[key]).norm() / want[key].norm()).item()
        print(json.dumps({"where": key, "relative_error": rel}), flush=True)
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    print(json.dumps({"where": "logits", "relative_error": rel}), flush=True)
dist.barrier()
shutdown()
