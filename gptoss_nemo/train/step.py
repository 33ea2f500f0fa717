"""One training step and one evaluation on megatron-core: the model wrapped for training, the optimizer, the LR
schedule, the loss reduction and the MoE auxiliary-loss report.

    model      GPTModel stage -> Float16Module (BF16 params) -> DDP (gradients reduced in FP32, or in BF16 with
               optimizer.main_grads_dtype=bf16)
    optimizer  megatron's distributed optimizer: AdamW (decoupled weight decay) on FP32 main weights sharded
               over the data-parallel ranks, gradient clipping on the global norm; lighter states and CPU offload
               as the recipe's memory savers say (train/memory_savers.py)
    schedule   OptimizerParamScheduler: linear warmup from 0, cosine decay to min_lr at the last step
    step       get_forward_backward_func() over the micro-batches of one global batch (PP schedules included),
               per-token loss: the LM loss is the mean over every loss token of the global batch, whatever the
               micro-batch and data-parallel split (calculate_per_token_loss; megatron scales the router's aux
               loss gradients to match)
    context    with parallel.cp > 1 each CP rank takes two of 2 x cp chunks of every sequence
               (`context_parallel_share`); megatron slices RoPE and TE's attention exchanges heads to match,
               and the per-token loss adds up over DP x CP ranks
    documents  packed conversations (data/packing.py) stay apart in attention: the fused local kernels take
               document ids [b, s] as the attention mask; TE's spec takes a micro-batch that packs several documents
               into a sequence as one THD sequence, its documents delimited by cu_seqlens (PackedSeqParams), and one of
               single documents (data.packing=false) as it is (causal, the padding after each document); megatron's
               reference modules see one causal sequence (documents attend to earlier ones: the baseline only)
"""

from __future__ import annotations

import time
from functools import partial

import torch

from gptoss_nemo.config.sft import SFTRecipe
from gptoss_nemo.model.megatron_config import RouterConfig
from gptoss_nemo.train.batches import GlobalBatches
from gptoss_nemo.train.flops import train_flops_per_token

# What megatron's router records per layer for each balancing-loss type (divided by its coefficient).
AUX_LOSS_METRIC = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                   "global_aux_loss": "global_load_balancing_loss"}


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """output: per-token LM loss [b, s]. Returns (sum of masked losses, number of loss tokens, report)."""
    mask = loss_mask.float()
    total = (output.float() * mask).sum()
    return total, mask.sum().to(torch.int), {"lm loss": torch.stack([total.detach(), mask.sum()])}


def impl_of(model) -> str:
    from megatron.core.utils import get_model_config

    return getattr(get_model_config(model), "impl", "reference")


def document_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] position ids (restarting at 0 in each document, 0 on padding) -> int32 cu_seqlens of the micro-batch
    as one sequence of b*s tokens: a segment per document, one for each sequence's padding (two position-0 tokens in
    a row are padding: every document has at least two tokens, data/packing.py), a boundary at every sequence start."""
    b, s = position_ids.shape
    pos = position_ids.reshape(-1)
    start = pos == 0
    start[1:] &= pos[:-1] != 0
    start[::s] = True
    return torch.cat([start.nonzero().reshape(-1), torch.tensor([b * s])]).to(torch.int32)


def thd_params(position_ids: torch.Tensor, device):
    """TE's packed-sequence (THD) attention parameters for a CPU [b, s] micro-batch of position ids."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = document_segments(position_ids)
    longest = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(device, non_blocking=True)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def model_inputs(impl: str, cpu_batch: dict[str, torch.Tensor], device, thd: bool = False) -> tuple[dict, dict]:
    """(the micro-batch on `device` as the model takes it, the model's document arguments) for implementation
    `impl`. TE with packed documents (thd): the micro-batch flattened into one THD sequence [1, b*s] with
    cu_seqlens; fused: document ids [b, s]."""
    thd = thd and impl == "te"
    if thd:
        packed = thd_params(cpu_batch["position_ids"], device)
        cpu_batch = {k: v.reshape(1, -1) for k, v in cpu_batch.items()}
    batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
    if thd:
        return batch, {"attention_mask": None, "packed_seq_params": packed}
    if impl == "fused":
        from gptoss_nemo.model.flex_attention import document_ids

        return batch, {"attention_mask": document_ids(batch["position_ids"])}
    return batch, {"attention_mask": None}


def context_parallel_share(cpu_batch: dict[str, torch.Tensor], cp: int, rank: int) -> dict[str, torch.Tensor]:
    """This context-parallel rank's part of every [b, s] tensor of a micro-batch: the sequence cut into 2 x cp equal
    chunks, rank r keeping chunks r and 2cp - 1 - r (megatron's load balancing for causal attention, the order its
    RoPE and TE's all-to-all attention assume)."""
    if cp == 1:
        return cpu_batch
    out = {}
    for key, value in cpu_batch.items():
        b, s = value.shape[:2]
        chunks = value.reshape(b, 2 * cp, s // (2 * cp), *value.shape[2:])
        out[key] = torch.cat([chunks[:, rank], chunks[:, 2 * cp - 1 - rank]], dim=1)
    return out


def forward_step(data_iterator, model, thd: bool = False):
    from megatron.core import parallel_state as ps

    cpu_batch = context_parallel_share(next(data_iterator), ps.get_context_parallel_world_size(),
                                       ps.get_context_parallel_rank())
    batch, documents = model_inputs(impl_of(model), cpu_batch, torch.cuda.current_device(), thd)
    output = model(batch["tokens"], batch["position_ids"], labels=batch["labels"], **documents)
    return output, partial(loss_func, batch["loss_mask"])


def build_training(recipe: SFTRecipe, model):
    """Wrap a loaded model stage for training; returns (model, optimizer, scheduler)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    config, savers = model.config, recipe.memory
    experts_in_their_own_optimizer(model)
    model = Float16Module(config, model)
    # overlap_param_gather stays off: it waits for gathered weights in each module's forward pre-hook, and the fused
    # grouped-GEMM experts read their linears' weights without calling those modules (model/grouped_experts.py).
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=savers.grad_reduce_in_fp32,
                                              use_distributed_optimizer=True,
                                              overlap_grad_reduce=False, overlap_param_gather=False,
                                              check_for_nan_in_grad=True), model)
    o, steps = recipe.optimizer, recipe.train.steps
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
                        bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True,
                        **savers.optimizer_fields()),
        [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=steps, lr_decay_style="cosine", start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant")
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return model, optimizer, scheduler


def experts_in_their_own_optimizer(gpt) -> None:
    """Mark the expert parameters as reduced over the expert-data-parallel group under every layout.

    megatron does so only when EP > 1 (or ETP != TP); with EP = 1 and TP = 1 the experts join the dense
    parameters, so the distributed optimizer is one optimizer instead of [dense, experts] and its checkpoint has
    another structure: an EP1 training checkpoint then fails to resume under EP2 ("Expected 2 entries in state
    dict, but got 4", seen on GPUs). With EP = TP = 1 the expert-data-parallel group is the data-parallel group,
    so gradients are reduced over the same ranks either way; the update is the same AdamW, per element."""
    for name, param in gpt.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def run_global_batch(model, batches: GlobalBatches, step: int, seq_length: int, forward_only: bool) -> torch.Tensor:
    """Forward (and backward unless forward_only) over global batch `step`; returns this rank's
    [sum of masked token losses, loss tokens] (zeros off the last stage and on TP ranks > 0, which hold copies)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gptoss_nemo.model.grouped_experts import expert_weight_cache

    thd = impl_of(model) == "te" and batches.packs_documents  # decided per run: PP needs one shape throughout
    # what pipeline stages send each other: [s, b, h], or [b*s, 1, h] for TE's THD micro-batches
    seq, mbs = (seq_length * batches.mbs, 1) if thd else (seq_length, batches.mbs)
    with expert_weight_cache(model):  # the fused kernels' experts stack / fake-quantize weights once per batch
        reports = get_forward_backward_func()(
            forward_step_func=partial(forward_step, thd=thd), data_iterator=iter(batches.microbatches(step)),
            model=[model],
            num_microbatches=batches.num_microbatches, seq_length=seq, micro_batch_size=mbs,
            decoder_seq_length=seq, forward_only=forward_only)
    totals = torch.zeros(2, device="cuda")
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for r in reports:
            totals += r["lm loss"]
    return totals


def global_mean(totals: torch.Tensor) -> tuple[float, int]:
    """(per-token mean loss, loss tokens) of the global batch: sums over every rank (data-parallel replicas add
    up, other stages and TP ranks > 0 add zeros)."""
    import torch.distributed as dist

    totals = totals.clone()
    dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())


def train_step(model, optimizer, scheduler, batches: GlobalBatches, step: int, seq_length: int) -> dict:
    model.zero_grad_buffer()
    optimizer.zero_grad()
    start = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
    totals = run_global_batch(model, batches, step, seq_length, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    lm_loss, tokens = global_mean(totals)
    return {"lm_loss": lm_loss, "loss_tokens": tokens, "grad_norm": float(grad_norm) if grad_norm is not None else
            float("nan"), "update_ok": bool(ok), "lr": lr, "seconds": time.perf_counter() - start,
            "peak_gib": peak_gib_of_all_ranks()}


def peak_gib_of_all_ranks() -> float:
    """Collective: the largest peak allocated memory of any rank (expert ranks differ: routing is not balanced)."""
    import torch.distributed as dist

    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30], device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item()


def aux_losses(router: RouterConfig, num_layers: int, num_microbatches: int, step: int) -> dict:
    """Collective (every rank, every step; it also clears megatron's tracker). The balancing loss (and z-loss)
    averaged over layers and micro-batches, as megatron records it: divided by its coefficient, so 1.0 means
    perfectly balanced for `aux_loss`. `weighted` = what the losses add to the objective (coefficient x layers)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    names = {"aux_loss": AUX_LOSS_METRIC[router.load_balancing_type]}
    coeffs = {"aux_loss": router.aux_loss_coeff}
    if router.z_loss_coeff:
        names["z_loss"], coeffs["z_loss"] = "z_loss", router.z_loss_coeff
    found: dict = {}
    get_moe_metrics_tracker().report(loss_scale=1 / num_microbatches, iteration=step, num_layers=num_layers,
                                     force_initialize=True, track_names=list(names.values()), total_loss_dict=found)
    out = {key: float(found[name]) for key, name in names.items() if name in found}
    out["weighted"] = sum(coeffs[k] * num_layers * v for k, v in out.items())
    return out


def evaluate(model, batches: GlobalBatches, num_batches: int, seq_length: int) -> float:
    """Mean LM loss per token over the first `num_batches` global batches of the validation set (no grad)."""
    model.eval()
    totals = torch.zeros(2, device="cuda")
    with torch.no_grad():
        for step in range(num_batches):
            totals += run_global_batch(model, batches, step, seq_length, forward_only=True)
    model.train()
    return global_mean(totals)[0]


def throughput(cfg, seq_length: int, global_batch_size: int, seconds: float, world_size: int) -> dict:
    """Tokens/s/GPU counts every position of the global batch (padding included); TFLOP/s/GPU uses the model
    FLOPs of train/flops.py (active experts only)."""
    tokens = seq_length * global_batch_size
    return {"tokens_per_s_per_gpu": tokens / seconds / world_size,
            "tflops_per_gpu": train_flops_per_token(cfg, seq_length) * tokens / seconds / world_size / 1e12}
