"""The SFT training loop on megatron-core (DRAFT: written against megatron-core 0.19.2's sources, not yet run on a
GPU; not wired into the CLI until the GPU tier has exercised it — see the issue 4 notes).

    model      GPTModel stage -> Float16Module (BF16 everywhere, norms included) -> DDP (FP32 grad reduce)
    optimizer  megatron distributed optimizer, AdamW on FP32 main weights, gradient clipping
    schedule   OptimizerParamScheduler: linear warmup, cosine decay to min_lr
    step       get_forward_backward_func() over num_microbatches micro-batches; per-token loss
               (calculate_per_token_loss: the LM loss is the mean over all loss tokens of the global batch, and
               megatron scales the MoE aux loss to match)
"""

from __future__ import annotations

import time
from functools import partial

import torch

from gptoss_nemo.config.sft import SFTRecipe
from gptoss_nemo.train.batches import GlobalBatches
from gptoss_nemo.train.flops import train_flops_per_token


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """output: per-token LM loss [b, s]. Returns (sum of masked losses, number of loss tokens, report)."""
    mask = loss_mask.float()
    total = (output.float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm loss": torch.stack([total.detach(), mask.sum()])}


def forward_step(data_iterator, model):
    batch = {k: v.cuda(non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def build_training(recipe: SFTRecipe, model):
    """Wrap a loaded model stage for training; returns (model, optimizer, scheduler)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    config = model.config
    model = Float16Module(config, model)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                              overlap_grad_reduce=False, check_for_nan_in_grad=True), model)
    o = recipe.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
                        bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True),
        [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=recipe.train.steps, lr_decay_style="cosine", start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=recipe.train.steps, wd_incr_style="constant")
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, batches: GlobalBatches, step: int, seq_length: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    start = time.perf_counter()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches.microbatches(step)), model=[model],
        num_microbatches=batches.num_microbatches, seq_length=seq_length, micro_batch_size=batches.mbs,
        decoder_seq_length=seq_length, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    totals = torch.zeros(2, device="cuda")
    if ps.is_pipeline_last_stage():
        for r in reports:
            totals += r["lm loss"]
    dist.all_reduce(totals)  # over every rank: DP replicas add up, other stages add zeros
    return {"lm_loss": (totals[0] / totals[1].clamp(min=1)).item(), "loss_tokens": int(totals[1].item()),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "update_ok": bool(ok),
            "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}


def throughput(cfg, seq_length: int, global_batch_size: int, seconds: float, world_size: int) -> dict:
    tokens = seq_length * global_batch_size
    return {"tokens_per_s_per_gpu": tokens / seconds / world_size,
            "tflops_per_gpu": train_flops_per_token(cfg, seq_length) * tokens / seconds / world_size / 1e12}
