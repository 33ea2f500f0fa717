"""`gptoss-nemo verify-export OUT_DIR --against CKPT`: does a Hugging Face export compute what the checkpoint
computes? The export is loaded with transformers (MXFP4 experts dequantized as transformers does, BF16, eager
attention with sinks), the checkpoint as the megatron model (a QAT / PTQ checkpoint with its ModelOpt fake-quant
quantizers restored), both run the same validation sequences (harmony-rendered conversations of `--data`, packed
to `--seq-length` tokens), and the full-vocabulary logits are compared: cosine similarity per sequence and top-1
agreement over every position. transformers' FP32 logits on the same sequences give the noise floor beside them
(`--no-floor` skips it: it loads the export a second time in FP32): how far transformers' own BF16 lies from its
FP32, and how far the megatron model's BF16 does. Two BF16 implementations can only be held to each other as
tightly as each one's rounding allows; the second pair says whether the megatron model is as accurate as
transformers at BF16. `--router-dtype bf16` routes the megatron model as transformers does (router logits and
the top-k softmax in BF16) instead of training's FP32 router: a like-for-like BF16 comparison. Near-tied experts
are then chosen the same way by both, where an FP32 and a BF16 router pick differently.

Checks before any GPU work: the export is a gpt-oss HF checkpoint, the checkpoint a gptoss-nemo one, both
describe the same architecture, the data reads, the layout fits the world size. Launched like every stage
(torchrun / srun; the megatron model under `--tp/--ep/--pp`); rank 0 runs transformers (device_map="auto" over
the GPUs its process sees, after the megatron model is freed) and prints the result.
"""

from __future__ import annotations

import gc
from dataclasses import fields
from pathlib import Path

import torch

from gptoss_nemo.errors import CheckpointError

# --router-dtype -> megatron's moe_router_dtype (None: the input's dtype, BF16, as transformers routes)
ROUTER_DTYPES = {"fp32": "fp32", "bf16": None}

# architecture fields that must agree between the export and the checkpoint
_ARCH = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok",
         "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "sliding_window")


def check_pair(out_dir: str | Path, ckpt: str | Path):
    """(the export's config, the checkpoint's config); CheckpointError naming the first difference."""
    from gptoss_nemo.checkpoint.hf_layout import check_checkpoint
    from gptoss_nemo.convert.dist_checkpoint import read_dist_checkpoint_config

    exported = check_checkpoint(out_dir)
    cfg, _ = read_dist_checkpoint_config(ckpt)
    names = {f.name for f in fields(cfg)}
    for name in _ARCH:
        if name in names and getattr(exported, name) != getattr(cfg, name):
            raise CheckpointError(f"{out_dir} is not an export of {ckpt}: {name} is {getattr(exported, name)} there "
                                  f"and {getattr(cfg, name)} in the checkpoint")
    if not (Path(out_dir) / "tokenizer.json").is_file():
        raise CheckpointError(f"{out_dir}: no tokenizer.json; verification renders the --data conversations with it")
    return exported, cfg


def sequences(out_dir: str | Path, data: list[str], samples: int, seq_length: int) -> torch.Tensor:
    """[n <= samples, seq_length] token ids: the conversations of `data`, harmony-rendered and packed."""
    from transformers import AutoTokenizer

    from gptoss_nemo.data.dataset import DataConfig, build_datasets
    from gptoss_nemo.errors import DataError
    from gptoss_nemo.tokenizer.o200k_harmony import HARMONY_SPECIAL_TOKENS, PAD

    cfg = DataConfig(train=list(data), validation_fraction=0.0, seq_length=seq_length, packing=True)
    train, _, _ = build_datasets(cfg, AutoTokenizer.from_pretrained(out_dir), HARMONY_SPECIAL_TOKENS[PAD])
    if not train:
        raise DataError(f"--data {' '.join(data)}: no sequence of {seq_length} tokens")
    return torch.stack([torch.as_tensor(s.tokens) for s in train[:samples]])


def verify_export(out_dir: str | Path, ckpt: str | Path, layout, *, data: list[str], samples: int = 8,
                  seq_length: int = 512, impl: str = "auto", floor: bool = True,
                  router_dtype: str = "fp32", keep_logits: bool = False) -> dict | None:
    """Collective. Rank 0 returns the comparison; other ranks None. `keep_logits`: the result also holds the
    sequences (`ids`, [n, seq_length]) and the megatron model's logits on them (`logits`, [n, seq_length, vocab],
    BF16), for a further comparison (`verify-export --engine vllm --against`)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gptoss_nemo.convert.dist_checkpoint import load_dist_checkpoint
    from gptoss_nemo.convert.megatron_to_hf import fetch_to_rank0
    from gptoss_nemo.evaluate.logits import megatron_logits
    from gptoss_nemo.model.build import build_rank_model
    from gptoss_nemo.model.impl import resolve_impl
    from gptoss_nemo.parallel.setup import env_world_size, init_distributed

    _, cfg = check_pair(out_dir, ckpt)
    if seq_length > cfg.max_position_embeddings:
        raise CheckpointError(f"--seq-length {seq_length} exceeds the model's {cfg.max_position_embeddings} positions")
    ids = sequences(out_dir, data, samples, seq_length)
    impl = resolve_impl(impl, layout=layout)
    layout.validate(cfg, env_world_size(), te=impl.te, training=False)
    init_distributed(layout)
    model = build_rank_model(cfg, layout, impl=impl, parallel_output=False,
                             moe_router_dtype=ROUTER_DTYPES[router_dtype])
    load_dist_checkpoint(model, ckpt)
    last = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and \
        ps.get_data_parallel_rank() == 0
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, last)
    src = flags.index(True)
    ours, device = [], torch.device("cuda", torch.cuda.current_device())
    for seq in ids:  # the last stage's logits to rank 0, one sequence at a time
        out = megatron_logits(model, seq.unsqueeze(0).cuda())
        local = {"logits": out.to(torch.bfloat16)} if out is not None else {}
        got = fetch_to_rank0(dist.get_rank(), src, local, ["logits"], device)
        if got is not None:
            ours.append(got["logits"])
    del model
    gc.collect()
    torch.cuda.empty_cache()
    result = None
    if dist.get_rank() == 0:
        result = _against_transformers(out_dir, ids, torch.cat(ours), floor)
        result.update({"export": str(out_dir), "checkpoint": str(ckpt), "impl": impl.name, "sequences": len(ids),
                       "seq_length": seq_length, "router_dtype": router_dtype})
        if keep_logits:
            result.update(ids=ids, logits=torch.cat(ours).cpu())
    dist.barrier()
    return result


def _against_transformers(out_dir, ids: torch.Tensor, ours: torch.Tensor, floor: bool) -> dict:
    from transformers import GptOssForCausalLM

    from gptoss_nemo.checkpoint.hf_layout import check_checkpoint
    from gptoss_nemo.evaluate.logits import compare

    kwargs = {}
    if check_checkpoint(out_dir).quantized:
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    logits = {}
    for dtype in (torch.bfloat16, torch.float32) if floor else (torch.bfloat16,):
        model = GptOssForCausalLM.from_pretrained(out_dir, dtype=dtype, attn_implementation="eager",
                                                  device_map="auto", **kwargs).eval()
        with torch.no_grad():
            logits[dtype] = torch.cat([model(input_ids=s.unsqueeze(0).to(model.device)).logits.cpu() for s in ids])
        del model
        gc.collect()
        torch.cuda.empty_cache()
    ref = compare(logits[torch.bfloat16].float(), ours.float())
    out = {"min_cos": ref["min_cos"], "mean_cos": sum(ref["cos_per_sequence"]) / len(ref["cos_per_sequence"]),
           "top1": ref["top1"]}
    if floor:
        pairs = {"transformers_bf16_vs_fp32": logits[torch.bfloat16], "megatron_vs_transformers_fp32": ours}
        for key, bf16 in pairs.items():
            noise = compare(logits[torch.float32], bf16.float())
            out[key] = {"min_cos": noise["min_cos"], "top1": noise["top1"]}
    return out
