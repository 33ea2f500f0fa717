"""Workarounds for bugs in the installed megatron-core and nvidia-modelopt, each applied only where the installed
code has the bug.

Every patch detects the bug in the installed source (not by version number alone), so a fixed release is
left untouched, and a changed one that no longer contains the exact line is left alone too: the tests that
exercise the path then tell whether the workaround is still needed. `apply_megatron_patches()` is idempotent
and is called by the model builder; it returns the names of the patches in effect. `apply_modelopt_patches()` is
its counterpart, called before ModelOpt quantizes or restores a model.

1. expert_bias_inplace_add — megatron-core 0.19.2, `megatron/core/transformer/mlp.py`, `MLP.forward`:
   for experts with biases (gpt-oss) the fc2 bias is folded in with
       output += output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)
   where `output` is the output of a custom autograd Function (`_ReduceFromModelParallelRegion`, a view).
   With autograd recording, torch raises "Output 0 of ... is a view and is being modified inplace ... This
   behavior is forbidden". The fix makes that one add out of place. Seen with the local spec (SequentialMLP);
   reproduced on CPU by tests/test_compat.py. Upstream: NVIDIA/Megatron-LM, same file and line (no issue
   was found filed for it as of 2026-11).

2. empty_optimizer_state_on_load — megatron-core 0.19.2, `megatron/core/optimizer/distrib_optimizer.py`,
   `DistributedOptimizer.state_dict`: without Apex or Transformer Engine the inner optimizer is torch's AdamW,
   whose per-parameter state is empty until its first step, and `state_dict` does
       steps = list(set([s["step"].item() for s in inner_state_dict["state"].values()])); assert len(steps) == 1
   so building the sharded state dict to *load* a training checkpoint into a fresh optimizer fails (resume).
   `fill_empty_optimizer_state` gives such an optimizer placeholder state with megatron's own helper (the one it
   uses for FSDP loads, `_init_optimizer_states_with_dummy_values`: a zero-gradient step at the scheduler's
   initial LR); the checkpoint then overwrites every value (FP32 main weights, moments, step). Applied only when
   the installed optimizer has the assertion and is running without Apex/TE, and only to optimizers with no state.
   Seen on the GPU tier (SIGKILL-resume test). Upstream: NVIDIA/Megatron-LM, same file (no issue found filed).

3. adamw_step_key_on_load — the same file and setup, `DistributedOptimizer._set_main_param_and_optimizer_states`:
   loading `fully_reshardable` optimizer state copies every tensor of torch AdamW's per-parameter state,
   including its tensor `step`, from the checkpoint's per-parameter tensors, which hold only `param`, `exp_avg`
   and `exp_avg_sq` (`if not isinstance(tensors[key], torch.Tensor)` -> KeyError 'step'). `load_state_dict` has
   already restored `step` from the saved param groups, so the patch skips keys the checkpoint does not have
   (`tensors.get(key)`). Applied only without Apex/TE (with them the optimizer keeps `step` in its param groups).

4. adamw_shared_step_after_load — the same setup, `DistributedOptimizer.load_state_dict`: it restores torch
   AdamW's per-parameter `step` as ONE tensor object shared by every parameter (`s["step"] = step` in a loop).
   torch's foreach AdamW then increments that shared tensor once per parameter on the next step (with 3
   parameters at step 10 it reads 13, not 11), so the bias correction after a resume is wrong and the resumed
   losses drift from the uninterrupted run's (GPU tier: equal up to the first step after the checkpoint, then
   off by 1.6e-4 relative and growing). `unshare_adamw_steps` gives every parameter its own copy after the
   load; reproduced with plain torch on CPU by tests/test_compat.py. It acts only where it finds a shared tensor
   (the Apex/TE optimizers keep `step` in their param groups, so there it finds none).

5. linear_bias_in_gemm — megatron-core 0.19.2, `megatron/core/tensor_parallel/layers.py`,
   `LinearWithGradAccumulationAndAsyncCommunication.forward` (the local spec's linear layers):
       output = torch.matmul(total_input, weight.t())
       if bias is not None:
           output = output + bias
   rounds the GEMM's FP32 accumulator to BF16 and then rounds again after adding the bias. Transformer Engine's
   linears and `torch.nn.functional.linear` (transformers) add the bias inside the GEMM and round once. Of
   gpt-oss's linears only the biased QKV projection passes a bias here (the output projection and the experts
   hand theirs to a later fused add), so the patch makes exactly that layer's BF16 output one rounding closer to
   the reference. Not a crash: a numerics difference from TE and transformers that made the local spec's BF16
   logits noisier than transformers' own. Measured on the same 4-layer checkpoint with and without it (GPU tier,
   tests/gpu/RESULTS.md, eighth session): BF16 top-1 agreement with transformers 97.71% -> 98.10%, and the cosine
   deficit against FP32 3.6e-4 -> 2.5e-4 (transformers' own BF16: 3.0e-4). The backward is unchanged. Upstream:
   same file.

6. moe_local_checkpoint_keys — megatron-core 0.19.2, `megatron/core/models/gpt/gpt_layer_specs.py`,
   `get_gpt_layer_local_submodules`: the local spec maps `pre_mlp_layernorm.` to `mlp.linear_fc1.layer_norm_` in
   every layer's `sharded_state_dict_keys_map`, the name of a dense MLP's norm that TE fuses into its fc1. For MoE
   layers TE's spec keeps a separate `pre_mlp_layernorm` and no such mapping, so a checkpoint written under one spec
   fails to load under the other (`decoder.layers.pre_mlp_layernorm.weight ... not in state dict`, seen on an H200
   with TE 2.20). `moe_local_spec_checkpoint_keys` drops that entry from the local spec of MoE layers: both specs
   then write TE's name (checkpoints written before carry the old one, which convert/checkpoint_keys.py reads as an
   alias). Upstream: NVIDIA/Megatron-LM pull request #6270 (open as of 2026-08), which reports the same
   local/TE MoE norm key mismatch for gpt-oss.

7. modelopt_te_attention_sinks_tp — nvidia-modelopt 0.47.0, `modelopt/torch/quantization/plugins/megatron.py`,
   `_QuantTEDotProductAttention.sharded_state_dict`: ModelOpt converts every TE attention when it quantizes (its
   KV-cache quantizers stay disabled for the expert formats) and replaces megatron's `sharded_state_dict`, which
   shards the learnable softmax offset (gpt-oss's sinks) over tensor-parallel ranks like the heads, by one that
   declares every tensor replicated: with TP > 1 a QAT or PTQ checkpoint keeps TP rank 0's sinks for all heads.
   The patch returns megatron's own `TEDotProductAttention.sharded_state_dict`, which writes the quantizers' scalar
   state the same way and shards `softmax_offset` on its axis 0. Upstream: NVIDIA/Model-Optimizer, same file.

8. modelopt_expert_quantizer_names — the same file, `quant_module_set_extra_state`: a quantized module's quantizer
   configuration rides in its `_extra_state`, keyed by quantizer name. megatron's SequentialMLP experts (the local
   spec) have one `weight_quantizer` per expert linear; TE's grouped experts have `weight_quantizer.0..N-1` in one
   linear. ModelOpt falls back from `weight_quantizer.i` to `weight_quantizer.0` only, so a QAT checkpoint written
   under one spec leaves the other's expert weight quantizers unconfigured. The patch adds the other fallback
   (`weight_quantizer.i` <-> `weight_quantizer`): every expert of a projection shares one configuration (the
   per-expert amax rides in the sharded tensors). Upstream: NVIDIA/Model-Optimizer, same file.

9. modelopt_grouped_amax_restore — nvidia-modelopt 0.47.0, `modelopt/torch/quantization/plugins/custom.py`,
   `_ParallelLinear.modelopt_post_restore`: restoring a quantized model resets the weight quantizer's amax and
   recalibrates it by calling the quantizer on `self.weight`. For TE's grouped experts the quantizer is a
   GroupedQuantizer, whose reset reaches every expert's quantizer but whose call runs only expert 0's, so experts
   1..N-1 come out of the restore with no amax, the checkpoint's per-expert amax is then not even requested, and
   NVFP4 falls back to each weight's own dynamic scale: a resumed or exported NVFP4 model under TE silently computes
   with other scales than it trained with (seen on the CPU with TE 2.20 and ModelOpt 0.47: 1 of 8 experts kept
   its amax). `grouped_amax_buffers` gives every expert quantizer lacking one an amax shaped like expert 0's before
   the checkpoint's tensors load, which then fill it. Upstream: NVIDIA/Model-Optimizer, same file.

10. router_bias_in_te_gemm — megatron-core 0.19.2, `megatron/core/transformer/moe/moe_utils.py`,
   `RouterGatingLinearFunction.forward`: wherever Transformer Engine imports (the NeMo container) the router's
   logits come from `te_general_gemm(weight, inp, router_dtype, bias=bias)`, whatever spec built the model. gpt-oss's
   router has a bias (BF16) and trains with `moe_router_dtype="fp32"`: an FP32 output with a BF16 bias, and the
   logits come out wrong. Measured on an H200 with TE 2.20.2 (tests/gpu/RESULTS.md, eleventh session), random tiny
   checkpoint, BF16 model with the FP32 router against transformers' FP32 logits: top-1 0.4% (fused, TE spec) and
   14.7% (reference modules) with TE installed, 97.7% without it; with the BF16 router 97.3-98.0% either way. The
   patch leaves the bias out of TE's GEMM and adds it in the router's dtype afterwards (the backward already treats
   the bias apart). Upstream: NVIDIA/Megatron-LM, same file.

11. dcp_restricted_unpickle — torch 2.11, `torch/distributed/checkpoint/filesystem.py`,
   `FileSystemReader.read_metadata` (`metadata = pickle.load(metadata_file)`) and `default_planner.py`,
   `DefaultLoadPlanner.load_bytes` (`torch.load(value, weights_only=False)`, inherited by megatron's
   `MCoreLoadPlanner`): loading any megatron dist checkpoint unpickles its `.metadata` file and its non-tensor
   items without restriction, so a crafted checkpoint (a copied run directory, a shared checkpoint) runs code on
   every rank that loads it. The patch reads `.metadata` with `restricted_load`, which resolves only the classes
   such metadata holds (torch.distributed.checkpoint's metadata classes, torch.Size, dtypes, layouts, paths) and
   refuses anything else, and loads the byte items with `weights_only=True` (what megatron's own common-state
   reader already does; checkpoints written by this package hold only tensors, numbers, strings and containers
   there). A refused file is an UnpicklingError naming the global it asked for. The one exception: the optimizer
   classes megatron's CPU-offloading optimizer keeps in its param groups (`optimizer_classes`: torch's AdamW, Adam,
   SGD and TE's FusedAdam, FusedSGD), allowed by name so that an `optimizer.cpu_offload_fraction` run resumes
   (GPU tier, thirteenth session: refused with "Unsupported global: torch.optim.adamw.AdamW" before). Upstream:
   pytorch/pytorch, same files (DCP's metadata is a pickle by design).

12. te_extra_state_unpickle — Transformer Engine 2.x before its own guard,
   `transformer_engine/pytorch/module/base.py`, `TransformerEngineBaseModule.set_extra_state`:
   `state = pickle.loads(state.detach().numpy(force=True).tobytes())`
   unpickles the `_extra_state` byte tensor every TE module has in a checkpoint (its FP8 metadata: dicts of numbers,
   strings and CPU tensors; empty in this package's BF16 and FP4 training), so under `model.impl=te` a crafted
   checkpoint runs code on load. The patch reads it with `load_extra_state`, i.e. megatron-core's own
   `SafeUnpickler` (megatron/core/safe_globals.py, what megatron's TE grouped linear already uses for these bytes:
   containers, numbers, tensors and TE's recipe classes, the storages weights-only), so anything else is refused.
   TE 2.20.2 has its own guard (`_extra_state.should_load_extra_state_pickle`: a non-empty pickle is refused unless
   its unsafe opt-in variable is set), so there the line is absent and nothing is patched (GPU tier, twelfth
   session: a pickled callable refused by TE itself). The patched form was run only through `load_extra_state` on
   the CPU: no older TE was at hand. Upstream: NVIDIA/TransformerEngine, same file (fixed there by the guard).

13. te_cp_sink_gradient — Transformer Engine 2.20 (d0067d0 and release_v2.19 alike),
   `transformer_engine/pytorch/attention/dot_product_attention/context_parallel.py`,
   `flash_attn_a2a_communicate_softmax_offset`: under context parallelism with the all-to-all exchange (the only one
   that takes learnable sinks), each CP rank computes the sinks of heads / CP heads over the whole sequence, and the
   backward all-gathers their gradient ("d_softmax_offset: all-gather from all ranks to all ranks"), so every CP rank
   returns the complete gradient of every sink. megatron's DDP then sums gradients over the data x context-parallel
   ranks, as is right for every other parameter (each CP rank's gradient covers its share of the tokens), and the
   sinks' gradient comes out CP times too large. `scale_sink_gradients_over_cp` registers a hook on each TE
   attention's `softmax_offset` that divides its gradient by CP before it is accumulated, so the reduced sum is the
   gradient. Applied only when the installed TE gathers that gradient (its source has the all-gather) and CP > 1.
   Found by reading the source, then seen on an H100 (TE 2.20.2, CP2 with both ranks on one GPU over gloo,
   tests/gpu/test_context_parallel_gpu.py): without the hook the sinks' gradients are twice CP1's (relative
   difference 0.98-1.01), with it within the BF16 noise. The hook itself is tested on the CPU. Upstream:
   NVIDIA/TransformerEngine and NVIDIA/Megatron-LM (no issue found filed; TE's own CP test compares each rank's
   gradient with the single-GPU one, which the gather makes equal).

14. checkpoint_without_output_fp8 — megatron-core 0.19.2, `megatron/core/tensor_parallel/random.py`,
   `CheckpointWithoutOutput.__init__(self, fp8=False)`: `self.fp8 = fp8 is not None` is True for the default
   `fp8=False`, so its forward calls TE's `FP8GlobalStateManager`, which is not imported where TE is absent:
   `train.recompute=selective` with `layernorm` (megatron's norm recompute builds it with no argument) fails with
   "NameError: name 'FP8GlobalStateManager' is not defined" on every machine without TE (seen on an H100, fused
   and reference implementations, TE not installed). With TE it only asks TE whether FP8 is on (no). The patch
   treats `fp8=False` like None. Upstream: NVIDIA/Megatron-LM, same file.

15. moe_topk_sorted_without_grad — megatron-core 0.19.2, `megatron/core/transformer/moe/moe_utils.py`,
   `topk_routing_with_score_function`: the router's top-k is `torch.topk(..., sorted=torch.is_grad_enabled())`,
   unsorted whenever autograd is off. gpt-oss takes the softmax over the k selected logits, and a softmax sums its
   k terms in the order top-k returns them, so the routing probabilities of a no-grad forward differ in the last
   bit from those of the same forward with grad. Activation recompute runs the first forward of every recomputed
   MoE block without grad and repeats it with grad in the backward: the loss then comes from one set of
   probabilities and the gradients from the other (``train.recompute`` with the moe module, or full, under
   model.impl=te and =reference: loss +5e-5 relative, expert gradients up to 0.1 relative on the tiny model, one
   H100; tests/gpu/RESULTS.md). Evaluation, generation and the recompute's first pass alike now sort, as
   training always did (a sort of k = 4 values per token; not measured). Upstream: NVIDIA/Megatron-LM #5601
   ("Undo #4414 topk moe sorting based on grad enabled", RL runs' logprob mismatch); the router module's imported
   name is repointed too.

16. hybrid_optimizer_group_step — megatron-core 0.19.2,
   `megatron/core/optimizer/cpu_offloading/hybrid_optimizer.py`, `_sync_hdo_param_groups_to_sub_optimizers`: with
   `optimizer.cpu_offload_fraction` the optimizer is megatron's HybridDeviceOptimizer, torch's AdamW on the CPU share
   and TE's FusedAdam on the GPU share; FusedAdam counts its Adam step in each param group. A checkpoint's load
   writes the step into the hybrid optimizer's own param groups, and before every step the hybrid optimizer copies
   its groups' attributes onto its sub-optimizers', step included: the GPU share's step is reset to the loaded one
   before each update, so after a resume every update used the bias correction of the first step after it (seen on
   an H100: SIGKILL at step 11, resumed from step 10, losses bitwise the uninterrupted run's to step 12, then off by
   up to 0.013 at step 20). The patch leaves `step` out of what is copied (the sub-optimizers are rebuilt from the
   loaded groups, so FusedAdam starts from the loaded step and counts on); with it the same kill and resume is
   bitwise for all 20 steps (H100, tests/gpu/RESULTS.md fifteenth session). Upstream: NVIDIA/Megatron-LM, same
   file (no issue found filed).

`_rewrite_method` recompiles methods of the installed libraries from their own installed source files
(`inspect.getsource`) with one fixed line replaced: nothing from a checkpoint, recipe or data file, nor any other
user input, reaches its compile/exec. Keep it that way.

`GPTOSS_NEMO_SKIP_PATCHES=name1,name2` leaves the named workarounds out (to check whether one is still needed).
"""

from __future__ import annotations

import inspect
import os
import pickle
import textwrap

import torch

_APPLIED: set[str] = set()

_INPLACE_BIAS = "output += output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)"
_OUT_OF_PLACE_BIAS = "output = output + output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)"


def _rewrite_method(cls, name: str, old: str, new: str, count: int = 1) -> bool:
    """Recompile `cls.name` (a class's method, or a module's function) with the source text `old` (`count` times in
    it, indented as in the dedented source) replaced by `new`; False if `old` is not there that many times. Static
    methods stay static. True at once when it is already rewritten."""
    is_static = isinstance(inspect.getattr_static(cls, name), staticmethod)
    func = getattr(cls, name)
    if getattr(func, "__gptoss_nemo_patched__", False):
        return True
    source = textwrap.dedent(inspect.getsource(func))
    if source.count(old) != count:
        return False
    if is_static:
        source = source.replace("@staticmethod\n", "", 1)
    module = inspect.getmodule(func)
    namespace: dict = {}
    code = compile(source.replace(old, new), inspect.getsourcefile(func) or "<patched>", "exec")
    exec(code, module.__dict__, namespace)  # noqa: S102 - recompiling the installed library's own method
    patched = namespace[name]
    patched.__qualname__ = func.__qualname__
    patched.__doc__ = func.__doc__
    patched.__gptoss_nemo_patched__ = True
    setattr(cls, name, staticmethod(patched) if is_static else patched)
    return True


def _patch_expert_bias_inplace_add() -> bool:
    from megatron.core.transformer.mlp import MLP

    return _rewrite_method(MLP, "forward", _INPLACE_BIAS, _OUT_OF_PLACE_BIAS)


_STEP_KEY = "if not isinstance(tensors[key], torch.Tensor):"


def _patch_adamw_step_key_on_load() -> bool:
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE:
        return False
    return _rewrite_method(dopt.DistributedOptimizer, "_set_main_param_and_optimizer_states", _STEP_KEY,
                           "if not isinstance(tensors.get(key), torch.Tensor):")


_BIAS_AFTER_GEMM = ("output = torch.matmul(total_input, weight.t())\n    if bias is not None:\n"
                    "        output = output + bias")
_BIAS_IN_GEMM = "output = torch.nn.functional.linear(total_input, weight, bias)"


def _patch_linear_bias_in_gemm() -> bool:
    from megatron.core.tensor_parallel.layers import LinearWithGradAccumulationAndAsyncCommunication as Linear

    return _rewrite_method(Linear, "forward", _BIAS_AFTER_GEMM, _BIAS_IN_GEMM)


_ROUTER_BIAS_IN_TE_GEMM = ('output = te_general_gemm(weight, inp, router_dtype, layout="TN", bias=bias)\n'
                           '        output = output[0]')
_ROUTER_BIAS_AFTER_TE_GEMM = ('output = te_general_gemm(weight, inp, router_dtype, layout="TN", bias=None)\n'
                              '        output = output[0] if bias is None else output[0] + bias.to(router_dtype)')


def _patch_router_bias_in_te_gemm() -> bool:
    from megatron.core.transformer.moe import moe_utils

    if getattr(moe_utils, "te_general_gemm", None) is None:  # without TE megatron's torch path is right
        return False
    return _rewrite_method(moe_utils.RouterGatingLinearFunction, "forward", _ROUTER_BIAS_IN_TE_GEMM,
                           _ROUTER_BIAS_AFTER_TE_GEMM)


# what a DCP `.metadata` pickle may name: classes of these modules, and these globals
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if module in _DCP_MODULES or (module, name) in _DCP_GLOBALS or (
            module == "torch" and name.isidentifier()) else None
        allowed = (module, name) in _DCP_GLOBALS or (
            isinstance(found, type) and module in _DCP_MODULES) or (
            module == "torch" and isinstance(found, torch.dtype | torch.layout | torch.memory_format))
        if not allowed:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}: a checkpoint's metadata holds only "
                                         "torch.distributed.checkpoint's classes, sizes and dtypes")
        return found


def restricted_load(f):
    """Unpickle a torch.distributed.checkpoint `.metadata` stream, resolving only what such metadata holds."""
    return _MetadataUnpickler(f).load()


def load_extra_state(state: torch.Tensor):
    """Transformer Engine's `_extra_state` byte tensor, unpickled with megatron-core's own allowlist for it
    (`megatron.core.safe_globals.SafeUnpickler`: containers, numbers, tensors, TE's recipe classes; importing
    megatron.core makes the tensors' storages load weights-only)."""
    import io

    from megatron.core.safe_globals import SafeUnpickler

    return SafeUnpickler(io.BytesIO(state.detach().cpu().numpy().tobytes())).load()


_TE_PICKLE_EXTRA = "state = pickle.loads(state.detach().numpy(force=True).tobytes())"
_TE_SAFE_EXTRA = "state = _gptoss_nemo_load_extra_state(state)"


def _patch_te_extra_state_unpickle() -> bool:
    try:
        from transformer_engine.pytorch.module import base
    except ImportError:  # no Transformer Engine: nothing unpickles extra state this way
        return False
    base._gptoss_nemo_load_extra_state = load_extra_state
    return _rewrite_method(base.TransformerEngineBaseModule, "set_extra_state", _TE_PICKLE_EXTRA, _TE_SAFE_EXTRA)


_PICKLE_METADATA = "metadata = pickle.load(metadata_file)"
_RESTRICTED_METADATA = "metadata = _gptoss_nemo_restricted_load(metadata_file)"
_BYTES_ANY_PICKLE = "weights_only=False"
_BYTES_WEIGHTS_ONLY = "weights_only=True"


def optimizer_classes() -> list[type]:
    """The optimizer classes megatron's CPU-offloading optimizer (HybridDeviceOptimizer) keeps in its param groups
    (`cpu_optimizer_cls`, `gpu_optimizer_cls`), and so in a training checkpoint's byte items: allowed by the
    weights-only load of workaround 11 (a class reference, resolved by name; nothing else of a pickle's code runs)."""
    classes: list[type] = [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD]
    try:
        from transformer_engine.pytorch.optimizers import FusedAdam, FusedSGD

        classes += [FusedAdam, FusedSGD]
    except Exception:  # no Transformer Engine
        pass
    return classes


def _patch_dcp_restricted_unpickle() -> bool:
    from torch.distributed.checkpoint import default_planner, filesystem

    torch.serialization.add_safe_globals(optimizer_classes())

    filesystem._gptoss_nemo_restricted_load = restricted_load
    metadata = _rewrite_method(filesystem.FileSystemReader, "read_metadata", _PICKLE_METADATA, _RESTRICTED_METADATA)
    source = inspect.getsource(default_planner.DefaultLoadPlanner.load_bytes)
    load_bytes = _rewrite_method(default_planner.DefaultLoadPlanner, "load_bytes", _BYTES_ANY_PICKLE,
                                 _BYTES_WEIGHTS_ONLY, count=max(source.count(_BYTES_ANY_PICKLE), 1))
    return metadata or load_bytes


_CKPT_FP8 = "self.fp8 = fp8 is not None"


def _patch_checkpoint_without_output_fp8() -> bool:
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    return _rewrite_method(CheckpointWithoutOutput, "__init__", _CKPT_FP8,
                           "self.fp8 = fp8 is not None and fp8 is not False")


_TOPK_SORTED_WITH_GRAD = "torch.topk(scores, k=topk, dim=1, sorted=torch.is_grad_enabled())"


def _patch_moe_topk_sorted_without_grad() -> bool:
    from megatron.core.transformer.moe import moe_utils, router

    name = "topk_routing_with_score_function"
    if not _rewrite_method(moe_utils, name, _TOPK_SORTED_WITH_GRAD,
                           "torch.topk(scores, k=topk, dim=1, sorted=True)"):
        return False
    if getattr(router, name, None) is not None:  # router.py imported the function by name
        setattr(router, name, getattr(moe_utils, name))
    return True


_HDO_GROUP_ATTRS = 'del update_group_attrs["params"]'


def _patch_hybrid_optimizer_group_step() -> bool:
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    return _rewrite_method(HybridDeviceOptimizer, "_sync_hdo_param_groups_to_sub_optimizers", _HDO_GROUP_ATTRS,
                           'del update_group_attrs["params"]; update_group_attrs.pop("step", None)')


_PATCHES = {"expert_bias_inplace_add": _patch_expert_bias_inplace_add,
            "checkpoint_without_output_fp8": _patch_checkpoint_without_output_fp8,
            "dcp_restricted_unpickle": _patch_dcp_restricted_unpickle,
            "te_extra_state_unpickle": _patch_te_extra_state_unpickle,
            "adamw_step_key_on_load": _patch_adamw_step_key_on_load,
            "linear_bias_in_gemm": _patch_linear_bias_in_gemm,
            "router_bias_in_te_gemm": _patch_router_bias_in_te_gemm,
            "moe_topk_sorted_without_grad": _patch_moe_topk_sorted_without_grad,
            "hybrid_optimizer_group_step": _patch_hybrid_optimizer_group_step}

_LOCAL_MOE_NORM_KEY = "pre_mlp_layernorm."


def moe_local_spec_checkpoint_keys(spec):
    """Workaround 6: the local spec of an MoE layer (from `get_gpt_layer_local_spec(num_experts=...)`) without
    the dense-MLP key mapping of its pre-MLP norm, so it writes TE's key. Returns the spec (changed in place)."""
    keys = spec.submodules.sharded_state_dict_keys_map
    if "moe_local_checkpoint_keys" in skipped_patches() or not keys or _LOCAL_MOE_NORM_KEY not in keys:
        return spec
    spec.submodules.sharded_state_dict_keys_map = {k: v for k, v in keys.items() if k != _LOCAL_MOE_NORM_KEY}
    _APPLIED.add("moe_local_checkpoint_keys")
    return spec


_REPLICATED_ATTENTION = "make_sharded_tensors_for_checkpoint(state_dict, prefix, {}, sharded_offsets)"


def _patch_modelopt_te_attention_sinks_tp() -> bool:
    import inspect as _inspect

    from modelopt.torch.quantization.plugins import megatron as mo

    quant_attention = getattr(mo, "_QuantTEDotProductAttention", None)  # defined only when TE imports
    if quant_attention is None:
        return False
    if getattr(quant_attention.sharded_state_dict, "__gptoss_nemo_patched__", False):
        return True
    if _REPLICATED_ATTENTION not in _inspect.getsource(quant_attention.sharded_state_dict):
        return False
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return TEDotProductAttention.sharded_state_dict(self, prefix, sharded_offsets,
                                                        ensure_metadata_has_dp_cp_group(metadata))

    sharded_state_dict.__gptoss_nemo_patched__ = True
    quant_attention.sharded_state_dict = sharded_state_dict
    return True


_EXPERT_QUANTIZER_FALLBACK = "quantizer_substate = quantizer_state.get(fallback)"
_EXPERT_QUANTIZER_EITHER = ("quantizer_substate = quantizer_state.get(fallback, quantizer_state.get(re.sub("
                            "r'^weight_quantizer(\\.\\d+)?', lambda m: 'weight_quantizer' if m.group(1) else "
                            "'weight_quantizer.0', name)))")


def _patch_modelopt_expert_quantizer_names() -> bool:
    from modelopt.torch.quantization.plugins import megatron as mo

    return _rewrite_method(mo, "quant_module_set_extra_state", _EXPERT_QUANTIZER_FALLBACK, _EXPERT_QUANTIZER_EITHER)


_MODELOPT_PATCHES = {"modelopt_te_attention_sinks_tp": _patch_modelopt_te_attention_sinks_tp,
                     "modelopt_expert_quantizer_names": _patch_modelopt_expert_quantizer_names}


def grouped_amax_buffers(model: torch.nn.Module) -> int:
    """Workaround 9, after ModelOpt's restore and before the checkpoint's tensors load: every quantizer of a
    GroupedQuantizer whose first member has an amax gets one too (its value is the checkpoint's once loaded).
    Returns how many it added."""
    if "modelopt_grouped_amax_restore" in skipped_patches():
        return 0
    from modelopt.torch.quantization.nn import GroupedQuantizer

    added = 0
    for module in model.modules():
        if not isinstance(module, GroupedQuantizer) or getattr(module[0], "_amax", None) is None:
            continue
        for q in list(module)[1:]:
            if getattr(q, "_amax", None) is None:
                q.amax = module[0].amax.detach().clone()
                added += 1
    if added:
        _APPLIED.add("modelopt_grouped_amax_restore")
    return added


def apply_modelopt_patches() -> list[str]:
    """Apply the ModelOpt workarounds (before quantizing or restoring a quantized model); the names in effect."""
    return _apply(_MODELOPT_PATCHES)


def skipped_patches() -> set[str]:
    """The workarounds named in $GPTOSS_NEMO_SKIP_PATCHES (comma-separated)."""
    return {n.strip() for n in os.environ.get("GPTOSS_NEMO_SKIP_PATCHES", "").split(",") if n.strip()}


def apply_megatron_patches() -> list[str]:
    """Apply every workaround the installed megatron-core needs; return the names in effect."""
    return _apply(_PATCHES)


def _apply(patches: dict) -> list[str]:
    """Each patch not applied yet and not skipped; the names of all workarounds in effect."""
    skip = skipped_patches()
    for name, patch in patches.items():
        if name not in _APPLIED and name not in skip and patch():
            _APPLIED.add(name)
    return sorted(_APPLIED)


_STEP_ASSERT = "assert len(steps) == 1"


def _inner_torch_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            yield opt, inner


_TE_SINK_GRAD_GATHER = "d_softmax_offset: all-gather from all ranks to all ranks"


def te_gathers_sink_gradients() -> bool:
    """Whether the installed TE's all-to-all context-parallel attention hands every CP rank the whole sinks' gradient
    (workaround 13)."""
    try:
        from transformer_engine.pytorch.attention.dot_product_attention import context_parallel
    except Exception:  # no TE: nothing to work around
        return False
    fn = getattr(context_parallel, "flash_attn_a2a_communicate_softmax_offset", None)
    return fn is not None and _TE_SINK_GRAD_GATHER in inspect.getsource(fn)


def scale_sink_gradients_over_cp(model: torch.nn.Module, cp: int, gathered: bool | None = None) -> int:
    """Workaround 13: divide the gradient of every attention's `softmax_offset` by `cp` where TE gathers it whole on
    every CP rank; returns the number of hooks registered. gathered=None reads the installed TE's source."""
    if cp <= 1 or "te_cp_sink_gradient" in skipped_patches():
        return 0
    if not (te_gathers_sink_gradients() if gathered is None else gathered):
        return 0
    hooked = 0
    for module in model.modules():
        offset = getattr(module, "softmax_offset", None)
        if isinstance(offset, torch.nn.Parameter) and offset.requires_grad:
            offset.register_hook(lambda grad, cp=cp: grad / cp)
            hooked += 1
    if hooked:
        _APPLIED.add("te_cp_sink_gradient")
    return hooked


def unshare_adamw_steps(optimizer) -> int:
    """Workaround 4, right after `optimizer.load_state_dict(...)`: one `step` tensor per parameter again.
    Returns how many state entries got their own copy."""
    fixed = 0
    for _, inner in _inner_torch_optimizers(optimizer):
        seen: set[int] = set()
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.clone()
                    fixed += 1
                seen.add(id(step))
    return fixed


def fill_empty_optimizer_state(optimizer) -> bool:
    """Workaround 2, before loading a training checkpoint into `optimizer` (megatron's, possibly chained).
    Returns whether it did anything."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE or _STEP_ASSERT not in inspect.getsource(dopt.DistributedOptimizer.state_dict):
        return False
    done = False
    for opt, inner in _inner_torch_optimizers(optimizer):
        if isinstance(opt, dopt.DistributedOptimizer) and not inner.state:
            opt._init_optimizer_states_with_dummy_values()
            done = True
    return done
