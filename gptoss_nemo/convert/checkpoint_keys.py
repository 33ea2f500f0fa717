"""One checkpoint for every implementation: a dist checkpoint written under TE's spec loads into the local spec's
model and the reverse, model and optimizer state alike (model/impl.py: fused, te, reference).

The two megatron specs name almost every tensor alike (attention, router, experts: TE's grouped experts emit the
keys of SequentialMLP, quantizer amax included). What differs, and how a load request is matched to what the
checkpoint holds (`match_checkpoint`):

  pre-MLP norm   TE's MoE spec keeps `pre_mlp_layernorm.weight`; megatron's local spec renames it to
                 `mlp.linear_fc1.layer_norm_weight` (a dense model's fused norm). gptoss-nemo's local spec now
                 writes TE's name too (compat.py, moe_local_checkpoint_keys); checkpoints written before that carry
                 the old name, which is read as an alias.
  _extra_state   TE modules carry an `_extra_state` object (FP8 metadata, empty in BF16) that megatron's local
                 modules do not have; a request for one the checkpoint lacks is left out and the module keeps its
                 own (asserted: nothing else may be missing).
  quantizer amax ModelOpt writes a per-expert NVFP4 amax as [1] from SequentialMLP and as [] from TE's grouped
                 experts; a tensor with the same number of elements under the other shape is read and reshaped.

Anything else the checkpoint lacks stays in the request, and megatron's loader names the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

# Names of one tensor that a checkpoint may hold instead of the one requested (suffixes of the sharded key; either
# way round).
ALIASES = (("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),)
EXTRA_STATE = "_extra_state"


@dataclass
class Matched:
    """What `match_checkpoint` left out of or reshaped in a request (state-dict names, not sharded keys); renamed
    keys need nothing afterwards."""

    left_out: set[str] = field(default_factory=set)  # extra states the checkpoint does not have
    reshaped: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> the model's local shape

    def restore_shapes(self, state: dict) -> dict:
        """The loaded model state with the model's own shapes back."""
        for name, shape in self.reshaped.items():
            state[name] = state[name].reshape(shape)
        return state


def checkpoint_entries(ckpt_dir: str | Path) -> dict:
    """{sharded key: metadata (ShardedTensor without data, or ShardedObject)} of a dist checkpoint."""
    import pickle

    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from gptoss_nemo.compat import apply_megatron_patches
    from gptoss_nemo.errors import CheckpointError

    apply_megatron_patches()  # compat 11: the metadata pickle read with only its own classes allowed
    try:
        return {sh.key: sh for sh in load_sharded_metadata(str(ckpt_dir)).values()}
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{ckpt_dir}/.metadata: {e}; it was not written by torch.distributed.checkpoint (a "
                              "tampered or foreign checkpoint): do not load it") from None


def _alias(key: str) -> str | None:
    for names in ALIASES:
        for wanted, other in (names, names[::-1]):
            if key.endswith(wanted):
                return key[: -len(wanted)] + other
    return None


def _reshaped(sh, local_shape: tuple[int, ...]):
    """A ShardedTensor reading the same elements under another local shape (unsharded beyond its prepended axes)."""
    p = sh.prepend_axis_num
    if any(sh.global_offset[p:]) or any(f != 1 for f in (sh.axis_fragmentations or ())[p:]):
        return None
    return dataclasses.replace(
        sh, data=sh.data.reshape(local_shape), local_shape=local_shape,
        global_shape=(*sh.global_shape[:p], *local_shape),
        global_offset=(*sh.global_offset[:p], *(0,) * len(local_shape)),
        axis_fragmentations=(*sh.axis_fragmentations[:p], *(1,) * len(local_shape)) if sh.axis_fragmentations else None)


def match_checkpoint(sharded_sd: dict, entries: dict) -> Matched:
    """Adapt a model's flat sharded state dict (in place) to a checkpoint's `entries` (checkpoint_entries): aliases
    renamed, extra states it lacks left out, amax shapes matched. Build the optimizer's request from it afterwards:
    its keys follow the model's."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    m = Matched()
    for name, sh in list(sharded_sd.items()):
        key = getattr(sh, "key", None)
        if key is None:
            continue
        found = entries.get(key)
        if found is None and (alias := _alias(key)) in entries:
            sh.key = alias
            found = entries[alias]
        if found is None:
            if key.endswith(EXTRA_STATE):
                del sharded_sd[name]
                m.left_out.add(name)
            continue
        if isinstance(sh, ShardedTensor) and isinstance(found, ShardedTensor) and sh.data is not None:
            p = sh.prepend_axis_num
            stored = tuple(found.global_shape[p:])
            if tuple(sh.global_shape) != tuple(found.global_shape) and sh.data.numel() == math.prod(stored) and \
                    tuple(sh.global_shape[:p]) == tuple(found.global_shape[:p]):
                other = _reshaped(sh, stored)
                if other is not None:
                    sharded_sd[name] = other
                    m.reshaped[name] = tuple(sh.data.shape)
    return m


def load_into(module, state: dict, matched: Matched, where: str) -> None:
    """`module.load_state_dict` of a loaded state, strict except for the extra states the checkpoint lacked."""
    missing, unexpected = module.load_state_dict(matched.restore_shapes(state), strict=False)
    bad = sorted(set(missing) - matched.left_out) + sorted(unexpected)
    if bad:
        raise RuntimeError(f"{where}: state dict mismatch: {bad[:8]}")
