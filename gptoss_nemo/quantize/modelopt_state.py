"""ModelOpt fake quantization on this rank's megatron model stage: apply it, save and restore it with a
checkpoint, and read back the weights the quantized forward pass computes with.

    quantize        mtq.quantize with the format's ModelOpt preset (quantize/formats.py); formats with
                    calibrated scales get a forward loop over training batches
    save / restore  ModelOpt's megatron plugin: `CKPT/modelopt_state/` holds the quantization config (any layout
                    restores it); the quantizers' own state (amax, ...) rides in the model's sharded state dict
                    as `_extra_state`, so it reshards with the weights
    fake_quant      {parameter name: q(w)} of every enabled expert weight quantizer, exactly the tensor the
                    forward pass uses (ModelOpt's own quantizer, run on the weight; under TE's spec each grouped
                    expert's own quantizer, `weight_quantizer[i]` for `weight{i}`)
    shared amax     NVFP4 keeps one per-tensor scale per layer projection (quantize/formats.py). ModelOpt shares it
                    over SequentialMLP's experts (`sync_expert_weight_amax`) but not over TE's grouped experts,
                    whose GroupedQuantizer holds one quantizer per expert: `share_grouped_expert_amax` sets each to
                    the maximum over the layer's experts on every expert-parallel rank, as SequentialMLP gets.

The model is quantized after it has been wrapped for training (Float16Module, DDP), as Megatron-LM's ModelOpt
examples do: conversion swaps module classes in place, so the parameters the optimizer holds stay the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from gptoss_nemo.model.grouped_experts import register_with_modelopt
from gptoss_nemo.quantize.formats import FORMATS, modelopt_config

MODELOPT_SUBDIR = "modelopt_state"
_WEIGHT = re.compile(r"^weight\d*$")  # `weight`, or TE grouped experts' weight0..N


def quantize(gpt: torch.nn.Module, fmt: str, forward_loop: Callable[[], None] | None = None) -> None:
    """Collective. Converts `gpt` in place; `forward_loop()` runs the calibration batches when `fmt` needs them."""
    import modelopt.torch.quantization as mtq

    from gptoss_nemo.compat import apply_modelopt_patches

    apply_modelopt_patches()
    register_with_modelopt()
    loop = (lambda _model: forward_loop()) if FORMATS[fmt].calibrate and forward_loop is not None else None
    if mtq.quantize(gpt, modelopt_config(fmt), loop) is not gpt:
        raise RuntimeError("mtq.quantize returned a new model object; gptoss-nemo expects in-place conversion")
    if FORMATS[fmt].shared_expert_scale:
        share_grouped_expert_amax(gpt)


def _members(quantizer) -> list:
    """The quantizers of a GroupedQuantizer (TE's grouped experts, one per expert), or [quantizer]."""
    from modelopt.torch.quantization.nn import GroupedQuantizer

    return list(quantizer) if isinstance(quantizer, GroupedQuantizer) else [quantizer]


@torch.no_grad()
def share_grouped_expert_amax(gpt: torch.nn.Module) -> int:
    """Collective over the expert-parallel group: every expert weight quantizer of a GroupedQuantizer takes the
    maximum amax of its layer projection's experts (all EP ranks). Returns how many quantizers it set."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    done = 0
    for _, module in expert_weight_quantizers(gpt):
        members = _members(module.weight_quantizer)
        if len(members) == 1:
            continue  # SequentialMLP: ModelOpt's sync_expert_weight_amax did it
        amax = torch.stack([m.amax.float().max() for m in members]).max()
        if dist.is_initialized() and ps.get_expert_model_parallel_world_size() > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=ps.get_expert_model_parallel_group())
        for m in members:
            m.amax = torch.full_like(m.amax, amax.item())
            done += 1
    return done


def is_quantized(gpt: torch.nn.Module) -> bool:
    import modelopt.torch.opt as mto

    return mto.ModeloptStateManager.is_converted(gpt)


def save(gpt: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Collective; writes CKPT/modelopt_state/ (the model's `_extra_state` goes with the model's tensors)."""
    import torch.distributed as dist
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    if dist.get_rank() == 0:
        (Path(ckpt_dir) / MODELOPT_SUBDIR).mkdir(exist_ok=True)
    dist.barrier()
    save_sharded_modelopt_state([gpt], str(ckpt_dir))


def restore(gpt: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Collective: re-create the quantizers a checkpoint was saved with (before its weights are loaded)."""
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import restore_sharded_modelopt_state

    from gptoss_nemo.compat import apply_modelopt_patches, grouped_amax_buffers

    if not (Path(ckpt_dir) / MODELOPT_SUBDIR).is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no {MODELOPT_SUBDIR}/, but its metadata says it is quantized")
    apply_modelopt_patches()
    register_with_modelopt()
    models = [gpt]
    restore_sharded_modelopt_state(models, str(ckpt_dir))
    if models[0] is not gpt or not is_quantized(gpt):
        raise RuntimeError(f"{ckpt_dir}: restoring the ModelOpt state did not quantize the model in place")
    grouped_amax_buffers(gpt)  # TE's grouped experts: every expert's amax requested from the checkpoint


def global_layer(gpt: torch.nn.Module, name: str) -> int:
    """The 0-based model-wide layer of the module `decoder.layers.N...` of this pipeline stage (megatron's own
    `layer_number`, which counts the layers of the stages before)."""
    return gpt.decoder.layers[int(name.split(".")[2])].layer_number - 1


def expert_weight_quantizers(gpt: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(module name, module) of every expert linear layer whose weight quantizer is enabled."""
    for name, module in gpt.named_modules():
        q = getattr(module, "weight_quantizer", None)
        if q is not None and ".mlp.experts." in f".{name}." and q.is_enabled:
            yield name, module


@torch.no_grad()
def fake_quant(gpt: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: fake-quantized weight} for the quantized expert weights of this stage."""
    out = {}
    for name, module in expert_weight_quantizers(gpt):
        members = _members(module.weight_quantizer)
        for pname, p in module.named_parameters(recurse=False):
            if _WEIGHT.match(pname):
                index = int(pname[len("weight"):] or 0)  # TE's weight{i} has its own quantizer; `weight` one
                out[f"{name}.{pname}"] = members[index if len(members) > 1 else 0](p)
    return out


def weight_quantizer(fmt: str, amax: float | None = None) -> torch.nn.Module:
    """A standalone ModelOpt quantizer with the format's expert-weight configuration (the class and settings QAT's
    expert weights use, so the same kernel runs), on the current GPU; `amax`: its per-tensor amax (NVFP4)."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    entry = next(e for e in modelopt_config(fmt)["quant_cfg"]
                 if "weight_quantizer" in e.get("quantizer_name", "") and e.get("cfg"))
    q = TensorQuantizer(QuantizerAttributeConfig(**entry["cfg"])).cuda()
    if amax is not None:
        q.amax = torch.tensor(amax, dtype=torch.float32, device="cuda")
    return q


def expert_amax(gpt: torch.nn.Module) -> dict:
    """Collective. {(global layer, "linear_fc1" | "linear_fc2"): (weight amax, input amax or None)} on every
    rank, from the (expert-shared) quantizers of each layer's first local expert (TE: the max over its grouped experts,
    which share_grouped_expert_amax made equal)."""
    import torch.distributed as dist

    mine = {}
    for name, module in expert_weight_quantizers(gpt):
        layer, proj = global_layer(gpt, name), name.split(".")[-1]
        inq = getattr(module, "input_quantizer", None)
        amaxes = [m.amax for m in _members(module.weight_quantizer)]
        if any(a is None for a in amaxes):
            raise RuntimeError(f"{name}: the weight quantizer has no amax (not an NVFP4-quantized checkpoint?)")
        in_amax = float(inq.amax.max()) if inq is not None and inq.is_enabled and inq.amax is not None else None
        mine.setdefault((layer, proj), (max(float(a.max()) for a in amaxes), in_amax))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}
