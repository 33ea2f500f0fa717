"""Seeded random gpt-oss checkpoints in the exact openai/gpt-oss layout, for tests and the quickstart.

The same seed and shape give the same weights in both layouts: the BF16 checkpoint (`quantized=False`)
holds exactly the dequantized values of the MXFP4 one, so conversions can be compared bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from gptoss_nemo.checkpoint import mxfp4
from gptoss_nemo.checkpoint.hf_layout import check_checkpoint, expected_tensors
from gptoss_nemo.checkpoint.writer import atomic_dir, write_shards
from gptoss_nemo.model.hf_config import GptOssConfig, transformers_version
from gptoss_nemo.tokenizer.o200k_harmony import BOS, GENERATION_EOS_IDS, HARMONY_SPECIAL_TOKENS, PAD, save_tokenizer

STD = 0.02


def _random_tensors(cfg: GptOssConfig, seed: int, quantized: bool) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = STD, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    for name, (shape, _dtype) in expected_tensors(cfg, quantized=False).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # Draw in the MXFP4 orientation [E, out, in], round through MXFP4, emit the requested layout.
            e, a, b = shape  # BF16 layout is [E, in, out]
            blocks, scales = mxfp4.quantize(normal(e, b, a).to(torch.bfloat16))
            if quantized:
                yield name + "_blocks", blocks
                yield name + "_scales", scales
            else:
                yield name, mxfp4.dequantize(blocks, scales, torch.bfloat16).transpose(1, 2).contiguous()
            continue
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = normal(*shape, std=0.1, mean=1.0)
        elif name.endswith("sinks"):
            t = normal(*shape, std=1.0)
        elif name.endswith("bias"):
            t = normal(*shape, std=0.01)
        else:
            t = normal(*shape)
        yield name, t.to(torch.bfloat16)


def _generation_config() -> dict:
    return {
        "bos_token_id": HARMONY_SPECIAL_TOKENS[BOS],
        "eos_token_id": list(GENERATION_EOS_IDS),
        "pad_token_id": HARMONY_SPECIAL_TOKENS[PAD],
        "do_sample": True,
        "transformers_version": transformers_version(),  # as openai's and GenerationConfig.save_pretrained's
    }


def write_tiny_checkpoint(
    out_dir: str | Path,
    cfg: GptOssConfig,
    *,
    seed: int = 0,
    quantized: bool = True,
    max_shard_bytes: int = 64 * 1024**2,
    overwrite: bool = False,
    tokenizer: bool = True,
) -> Path:
    """Write a checkpoint of random weights for `cfg` to `out_dir`; returns the path.

    `tokenizer=False` leaves out the tokenizer files (GPU-tier tests run where bpe-openai is not installed).
    """
    cfg = cfg.replace(quantized=quantized)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_shards(_random_tensors(cfg, seed, quantized), tmp, max_shard_bytes)
        cfg.save(tmp)
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(), indent=2) + "\n")
        if tokenizer:
            save_tokenizer(tmp, model_max_length=cfg.max_position_embeddings)
        check_checkpoint(tmp)
    return out_dir
