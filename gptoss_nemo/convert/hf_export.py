"""Write a Hugging Face gpt-oss checkpoint (BF16, or MXFP4 experts) from a megatron model sharded in any layout.

Every rank calls `export_hf`; rank 0 writes, shard by shard, into a directory that appears only when complete
(config.json — with the openai/gpt-oss `quantization_config` for MXFP4, without for BF16 — the side files of the
source checkpoint, the index). MXFP4: convert/to_mxfp4.py, applied layer by layer as the tensors arrive.

A quantized (QAT / PTQ) checkpoint exports the weights its forward pass computes with: each expert weight
through its ModelOpt quantizer (quantize/modelopt_state.py `fake_quant`). `--format bf16` writes those values
in BF16; `--format mxfp4` packs them (an MXFP4-trained weight packs exactly: the codec reproduces ModelOpt's CUDA
fake quant, so every dequantized element equals the trained fake-quant value). `--format nvfp4` writes
ModelOpt's Hugging Face NVFP4 layout (convert/to_nvfp4.py) from the raw weights and the trained quantizers' amax
of an nvfp4 / nvfp4_w4a4 checkpoint, with ModelOpt's `quantization_config` and hf_quant_config.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptoss_nemo.checkpoint.hf_layout import check_checkpoint, checkpoint_bytes, copy_side_files
from gptoss_nemo.checkpoint.writer import DEFAULT_SHARD_BYTES, atomic_dir, check_target, write_shards
from gptoss_nemo.convert.hf_to_megatron import unwrap
from gptoss_nemo.convert.megatron_to_hf import gather_hf_tensors
from gptoss_nemo.convert.to_mxfp4 import to_mxfp4
from gptoss_nemo.convert.to_nvfp4 import quantization_configs, to_nvfp4
from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.impl import ModelImpl, resolve_impl
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.parallel.setup import all_coords, current_coords
from gptoss_nemo.quantize import modelopt_state

FORMATS = ("bf16", "mxfp4", "nvfp4")
NVFP4_TRAINED = ("nvfp4", "nvfp4_w4a4")


def export_hf(
    model: torch.nn.Module,
    cfg: GptOssConfig,
    layout: ParallelLayout,
    out_dir: str | Path,
    *,
    fmt: str = "bf16",
    side_files_from: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    import torch.distributed as dist

    check_target(out_dir, overwrite)  # on every rank, so none starts sending to a rank 0 that will refuse
    me = current_coords()
    coords = all_coords(me)
    gpt = unwrap(model)
    local = dict(gpt.named_parameters())
    amax = None
    if fmt == "nvfp4":  # codes and scales from the raw weights and the trained quantizers' amax
        amax = modelopt_state.expert_amax(gpt)
    elif modelopt_state.is_quantized(gpt):
        local.update(modelopt_state.fake_quant(gpt))
    tensors = gather_hf_tensors(local, cfg, layout, me, coords, te=bool(gpt.config.moe_grouped_gemm))
    if me.rank == 0:
        from gptoss_nemo.convert.progress import with_progress
        from gptoss_nemo.model.param_count import count_parameters

        tensors = with_progress(tensors, 2 * count_parameters(cfg).total)
        if fmt == "mxfp4":
            tensors = to_mxfp4(tensors)
        elif fmt == "nvfp4":
            tensors = to_nvfp4(tensors, amax)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            write_shards(tensors, tmp, max_shard_bytes)
            cfg.replace(quantized=fmt == "mxfp4").save(tmp)
            if side_files_from is not None:
                copy_side_files(side_files_from, tmp)
            if fmt == "nvfp4":
                write_nvfp4_config(tmp, cfg, activations=any(v[1] is not None for v in amax.values()))
            else:
                check_checkpoint(tmp)
    else:
        for _ in tensors:
            pass
    dist.barrier()
    return Path(out_dir)


def run_export(ckpt_dir: str | Path, out_dir: str | Path, layout: ParallelLayout, *, fmt: str = "bf16",
               overwrite: bool = False, impl: str | ModelImpl = "auto") -> Path:
    """`gptoss-nemo export --format bf16|mxfp4|nvfp4`: a gptoss-nemo checkpoint -> HF, spread over `layout`."""
    from gptoss_nemo.convert.dist_checkpoint import (
        HF_SUBDIR,
        load_dist_checkpoint,
        quant_format,
        read_dist_checkpoint_config,
    )
    from gptoss_nemo.model.build import build_rank_model
    from gptoss_nemo.parallel.setup import env_world_size, init_distributed

    cfg, meta = read_dist_checkpoint_config(ckpt_dir)
    check_format(quant_format(meta), fmt, ckpt_dir)
    impl = resolve_impl(impl, layout=layout)
    layout.validate(cfg, env_world_size(), te=impl.te, training=False)
    check_target(out_dir, overwrite, nbytes=checkpoint_bytes(cfg, quantized=fmt != "bf16"))
    init_distributed(layout)
    model = build_rank_model(cfg, layout, impl=impl)
    load_dist_checkpoint(model, ckpt_dir)
    return export_hf(model, cfg, layout, out_dir, fmt=fmt, side_files_from=Path(ckpt_dir) / HF_SUBDIR,
                     overwrite=overwrite)


def check_format(trained: str | None, fmt: str, ckpt_dir) -> None:
    """An export format must represent what the checkpoint computes with."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if trained and trained != "mxfp4" and fmt == "mxfp4":
        raise ConfigError(f"{ckpt_dir} was quantized with {trained}; packing its weights as MXFP4 would quantize them "
                          "a second time: export --format bf16 (its fake-quantized weights)")
    if fmt == "nvfp4" and trained not in NVFP4_TRAINED:
        raise ConfigError(f"{ckpt_dir} is {'quantized with ' + trained if trained else 'a BF16 checkpoint'}; an NVFP4 "
                          "export needs the NVFP4 scales of a QAT or PTQ run (gptoss-nemo qat/ptq with "
                          "quant.format=nvfp4 or nvfp4_w4a4)")


def write_nvfp4_config(out: Path, cfg: GptOssConfig, activations: bool) -> None:
    """config.json's `quantization_config` and hf_quant_config.json, as ModelOpt writes them."""
    import json

    config, hf_quant = quantization_configs(cfg.num_hidden_layers, activations)
    path = out / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "quantization_config": config}, indent=2) + "\n")
    (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2) + "\n")
