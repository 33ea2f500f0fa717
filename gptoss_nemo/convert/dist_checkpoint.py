"""The package's own checkpoint: a megatron-core distributed checkpoint plus what is needed to rebuild the model.

    OUT/                      megatron dist_checkpointing (torch_dist): loads under any TP x EP x PP layout
    OUT/gptoss_nemo.json      format version, where it came from, the layout and implementation (`impl`: fused,
                              te or reference; model/impl.py) it was written with: any implementation loads it
                              (convert/checkpoint_keys.py)
    OUT/hf/config.json        the gpt-oss model config (BF16, no quantization_config)
    OUT/hf/<side files>       tokenizer, chat template, generation config of the source checkpoint
    OUT/modelopt_state/       only in a quantized (QAT / PTQ) checkpoint: the ModelOpt quantization config; the
                              metadata names the format (`"quant": {"format": ..., "stage": ...}`)

Written into a temporary directory and renamed when every rank is done: an interrupted save leaves no
directory that looks complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from gptoss_nemo import __version__
from gptoss_nemo.checkpoint.hf_layout import copy_side_files
from gptoss_nemo.checkpoint.writer import collective_atomic_dir
from gptoss_nemo.convert.hf_to_megatron import unwrap
from gptoss_nemo.errors import CheckpointError
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.impl import IMPLS
from gptoss_nemo.parallel.layout import ParallelLayout

META_FILE = "gptoss_nemo.json"
HF_SUBDIR = "hf"
FORMAT = 1


def save_dist_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    cfg: GptOssConfig,
    *,
    layout: ParallelLayout,
    source: str,
    side_files_from: str | Path | None = None,
    overwrite: bool = False,
    extra: dict | None = None,
) -> Path:
    """Collective: every rank calls it with its own model stage (a quantized one also saves its ModelOpt state)."""
    from megatron.core import dist_checkpointing

    with collective_atomic_dir(out_dir, overwrite=overwrite) as tmp:
        dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(tmp))
        save_quant_state(model, tmp, extra)
        write_checkpoint_meta(tmp, cfg, layout=layout, impl=unwrap(model).config.impl, source=source,
                              side_files_from=side_files_from, extra=extra)
    return Path(out_dir)


def save_quant_state(model: torch.nn.Module, tmp: Path, extra: dict | None) -> None:
    """Collective. A quantized model saves its ModelOpt state, and its metadata must say so (and the reverse)."""
    from gptoss_nemo.quantize import modelopt_state

    gpt = unwrap(model)
    quantized = modelopt_state.is_quantized(gpt)
    if quantized != bool((extra or {}).get("quant")):
        raise RuntimeError(f"saving a {'quantized' if quantized else 'BF16'} model with metadata {extra}")
    if quantized:
        modelopt_state.save(gpt, tmp)


def write_checkpoint_meta(tmp: Path, cfg: GptOssConfig, *, layout: ParallelLayout, impl: str, source: str,
                          side_files_from: str | Path | None, extra: dict | None = None) -> None:
    """Rank 0 only (others return): gptoss_nemo.json and hf/ into a checkpoint being written, which makes any
    dist checkpoint holding the model's tensors (an import, a training step) a gptoss-nemo checkpoint."""
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return
    meta = {"format": FORMAT, "gptoss_nemo": __version__, "source": source, "saved_with": asdict(layout),
            "impl": impl, **(extra or {})}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / HF_SUBDIR).mkdir()
    cfg.replace(quantized=False).save(tmp / HF_SUBDIR)
    if side_files_from is not None:
        copy_side_files(side_files_from, tmp / HF_SUBDIR)


def read_dist_checkpoint_config(ckpt_dir: str | Path) -> tuple[GptOssConfig, dict]:
    """The model config and metadata of a gptoss-nemo checkpoint; a clear error for anything else."""
    d = Path(ckpt_dir)
    meta_file = d / META_FILE
    if not meta_file.is_file():
        hint = " (it looks like a Hugging Face checkpoint: run `gptoss-nemo import` on it first)" if (
            d / "config.json").is_file() else ""
        raise CheckpointError(f"{d}: not a gptoss-nemo checkpoint, {META_FILE} is missing{hint}")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e}); the checkpoint is damaged") from None
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: format {meta.get('format')!r}, this gptoss-nemo reads format {FORMAT}")
    if meta.get("impl", "reference") not in IMPLS:  # older checkpoints do not say; the loader reads either kind
        raise CheckpointError(f"{meta_file}: written by implementation {meta['impl']!r}, which this gptoss-nemo "
                              f"does not know ({', '.join(IMPLS)}); load it with the gptoss-nemo version that wrote "
                              f"it ({meta.get('gptoss_nemo', 'unknown')}) or a newer one")
    return GptOssConfig.from_file(d / HF_SUBDIR), meta


def quant_format(meta: dict) -> str | None:
    """The quantization format a checkpoint was trained / calibrated with (None for BF16)."""
    return (meta.get("quant") or {}).get("format")


def load_dist_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Collective: fill this rank's model stage from the checkpoint, whatever layout and implementation wrote it (an
    import or a training checkpoint, whose optimizer and scheduler state is left unread). A quantized checkpoint's
    quantizers are restored first, so the model computes as it did when saved."""
    from megatron.core import dist_checkpointing

    from gptoss_nemo.convert.checkpoint_keys import checkpoint_entries, load_into, match_checkpoint

    gpt = unwrap(model)
    _, meta = read_dist_checkpoint_config(ckpt_dir)
    if quant_format(meta):
        from gptoss_nemo.quantize import modelopt_state

        modelopt_state.restore(gpt, ckpt_dir)
    wanted = gpt.sharded_state_dict()
    matched = match_checkpoint(wanted, checkpoint_entries(ckpt_dir))
    state = dist_checkpointing.load(wanted, str(ckpt_dir))
    load_into(gpt, {k: state[k] for k in wanted}, matched, str(ckpt_dir))
