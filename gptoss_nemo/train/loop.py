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


def _loss_sums(model, batches: GlobalBatches, step: int, seq_length: int, forward_only: bool) -> torch.Tensor:
    """Run global batch `step` (forward and backward unless forward_only); returns this rank's
    [sum of masked token losses, loss tokens] (zeros off the last stage and on TP ranks > 0, which hold copies)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches.microbatches(step)), model=[model],
        num_microbatches=batches.num_microbatches, seq_length=seq_length, micro_batch_size=batches.mbs,
        decoder_seq_length=seq_length, forward_only=forward_only)
    totals = torch.zeros(2, device="cuda")
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for r in reports:
            totals += r["lm loss"]
    return totals


def _mean_loss(totals: torch.Tensor) -> torch.Tensor:
    """Sum over every rank (DP replicas add up, other stages add zeros), then the per-token mean."""
    import torch.distributed as dist

    dist.all_reduce(totals)
    return totals[0] / totals[1].clamp(min=1)


def train_step(model, optimizer, scheduler, batches: GlobalBatches, step: int, seq_length: int) -> dict:
    model.zero_grad_buffer()
    optimizer.zero_grad()
    start = time.perf_counter()
    totals = _loss_sums(model, batches, step, seq_length, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    lm_loss = _mean_loss(totals).item()  # all-reduces totals in place
    loss_tokens = int(totals[1].item())
    return {"lm_loss": lm_loss, "loss_tokens": loss_tokens,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "update_ok": bool(ok),
            "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}


def throughput(cfg, seq_length: int, global_batch_size: int, seconds: float, world_size: int) -> dict:
    tokens = seq_length * global_batch_size
    return {"tokens_per_s_per_gpu": tokens / seconds / world_size,
            "tflops_per_gpu": train_flops_per_token(cfg, seq_length) * tokens / seconds / world_size / 1e12}


def evaluate(model, batches: GlobalBatches, num_batches: int, seq_length: int) -> float:
    """Mean LM loss over the first `num_batches` global batches of the validation set (no grad)."""
    model.eval()
    totals = torch.zeros(2, device="cuda")
    with torch.no_grad():
        for step in range(num_batches):
            totals += _loss_sums(model, batches, step, seq_length, forward_only=True)
    model.train()
    return _mean_loss(totals).item()


class ExpertLoad:
    """Counts routed tokens per (local layer, expert) with forward hooks on the routers."""

    def __init__(self, gpt_model, num_experts: int):
        layers = gpt_model.decoder.layers
        self.counts = torch.zeros(len(layers), num_experts, device="cuda")
        self.first_layer = layers[0].layer_number - 1 if len(layers) else 0
        for i, layer in enumerate(layers):
            layer.mlp.router.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, inputs, output):
            routing_map = output[1]
            self.counts[i] += routing_map.sum(dim=0).float()
        return hook

    def take(self) -> torch.Tensor:
        """[layers of the whole model, experts] on every rank, summed over data-parallel replicas; then reset."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        counts = self.counts.clone()
        dist.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=True))
        pieces: list = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(pieces, (self.first_layer, counts.cpu()),
                               group=ps.get_pipeline_model_parallel_group())
        self.counts.zero_()
        return torch.cat([c for _, c in sorted(pieces, key=lambda p: p[0])])


def save_training(root, step: int, model, optimizer, scheduler, keep_last: int) -> None:
    """Collective. Model, optimizer (distributed shards), scheduler and step in one megatron dist checkpoint;
    per-rank RNG states beside it. Complete only once renamed (checkpoint_dirs)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, tensor_parallel

    from gptoss_nemo.checkpoint.writer import collective_atomic_dir
    from gptoss_nemo.train import checkpoint_dirs

    with collective_atomic_dir(checkpoint_dirs.step_dir(root, step)) as tmp:
        model_sd = model.sharded_state_dict()
        state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd),
                 "scheduler": scheduler.state_dict(), "step": step}
        dist_checkpointing.save(state, str(tmp))
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(),
               "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng, tmp / "rng" / f"rank_{dist.get_rank():05d}.pt")
    if dist.get_rank() == 0:
        checkpoint_dirs.mark_latest(root, step, keep_last)
    dist.barrier()


def load_training(root, step: int, model, optimizer, scheduler) -> None:
    """Collective. Restores what save_training wrote; RNG only when this rank's file exists (same world size)."""
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, tensor_parallel

    from gptoss_nemo.train import checkpoint_dirs

    path = checkpoint_dirs.step_dir(root, step)
    model_sd = model.sharded_state_dict()
    state = dist_checkpointing.load({"model": model_sd, "optimizer": optimizer.sharded_state_dict(
        model_sd, is_loading=True), "scheduler": None, "step": None}, str(path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = Path(path) / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])


def run_sft(recipe: SFTRecipe) -> dict:
    """Pre-flight on the CPU (recipe, checkpoint, layout, data), then train; returns the last metrics on rank 0."""
    import logging
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from gptoss_nemo.convert.dist_checkpoint import HF_SUBDIR, load_dist_checkpoint, read_dist_checkpoint_config
    from gptoss_nemo.data.dataset import build_datasets
    from gptoss_nemo.model.build import build_rank_model, resolve_use_te
    from gptoss_nemo.parallel.setup import env_world_size, init_distributed
    from gptoss_nemo.tokenizer.o200k_harmony import HARMONY_SPECIAL_TOKENS, PAD
    from gptoss_nemo.train import checkpoint_dirs
    from gptoss_nemo.train.expert_load import summarize, warnings
    from gptoss_nemo.train.metrics_log import MetricsLog, read_metrics
    from gptoss_nemo.train.plots import plot_expert_load, plot_losses

    log = logging.getLogger("gptoss_nemo.sft")
    t = recipe.train
    cfg, _ = read_dist_checkpoint_config(recipe.checkpoint)
    world = env_world_size()
    recipe.parallel.validate(cfg, world, te=resolve_use_te(None))
    dp = world // (recipe.parallel.tp * recipe.parallel.pp)
    tokenizer = AutoTokenizer.from_pretrained(Path(recipe.checkpoint) / HF_SUBDIR)
    pad = HARMONY_SPECIAL_TOKENS[PAD]
    train_seqs, valid_seqs, stats = build_datasets(recipe.data, tokenizer, pad)

    me = init_distributed(recipe.parallel, seed=t.seed)
    gpt = build_rank_model(cfg, recipe.parallel, recipe.router, calculate_per_token_loss=True)
    load_dist_checkpoint(gpt, recipe.checkpoint)
    load = ExpertLoad(gpt, cfg.num_local_experts)
    model, optimizer, scheduler = build_training(recipe, gpt)
    dp_rank = ps.get_data_parallel_rank()
    train = GlobalBatches(train_seqs, t.global_batch_size, t.micro_batch_size, dp_rank, dp, t.seed)
    valid = GlobalBatches(valid_seqs or train_seqs, t.global_batch_size, t.micro_batch_size, dp_rank, dp, t.seed)

    root = Path(t.out_dir) / "checkpoints"
    start = checkpoint_dirs.find_latest(root) or 0
    if start:
        load_training(root, start, model, optimizer, scheduler)
    metrics = MetricsLog(t.out_dir, t.tensorboard, t.wandb_project) if me.rank == 0 else None
    if me.rank == 0:
        log.info("data: %s", {"lines": stats.lines, "bad": stats.bad, **stats.outcomes, "tokens": stats.tokens})
    load_total = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts)
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    row: dict = {}
    for step in range(start, t.steps):
        row = {"step": step + 1, **train_step(model, optimizer, scheduler, train, step, recipe.data.seq_length)}
        aux: dict = {}
        get_moe_metrics_tracker().report(loss_scale=1 / train.num_microbatches, iteration=step + 1,
                                         num_layers=cfg.num_hidden_layers, force_initialize=True,
                                         track_names=["load_balancing_loss"], total_loss_dict=aux)
        row["aux_loss"] = float(sum(aux.values())) if aux else None
        row.update(throughput(cfg, recipe.data.seq_length, t.global_batch_size, row["seconds"], world))
        if (step + 1) % t.log_every == 0:
            counts = load.take()
            load_total += counts
            loads = summarize(counts)
            row["expert_max_over_mean"] = [round(x.max_over_mean, 3) for x in loads]
            for line in warnings(loads, t.expert_max_share):
                log.warning("step %d: %s", step + 1, line)
        if t.eval_every and (step + 1) % t.eval_every == 0:
            row["val_loss"] = evaluate(model, valid, t.eval_batches, recipe.data.seq_length)
        if metrics is not None:
            metrics.log(row.pop("step"), row)
            row["step"] = step + 1
        if (step + 1) % t.save_every == 0 or step + 1 == t.steps:
            save_training(root, step + 1, model, optimizer, scheduler, t.keep_last)
    if metrics is not None:
        metrics.close()
        plot_losses(read_metrics(metrics.jsonl), Path(t.out_dir) / "loss.png")
        plot_expert_load(load_total, Path(t.out_dir) / "expert_load.png")
        torch.save(load_total, Path(t.out_dir) / "expert_load.pt")
    dist.barrier()
    return row
