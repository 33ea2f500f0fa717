"""`gptoss-nemo sft RECIPE [a.b=c ...]`: BF16 full fine-tuning of gpt-oss with the router trained and its
load-balancing loss on.

Everything that can be wrong with the input is found before a GPU is touched (`prepare`): the recipe, the
checkpoint, the layout against the world size and the batch sizes, the logging backends, and the data (a
malformed line names its file and line; more bad lines than `data.max_bad_fraction` stop the run). Then each rank
builds its model stage, loads the checkpoint under the recipe's layout, and trains (train/step.py), resuming from
the newest complete checkpoint in RUN/checkpoints when there is one.

    RUN/metrics.jsonl        one line per step: loss = lm_loss + aux weighted, lm_loss, aux_loss (balancing loss
                             averaged over layers, 1.0 = balanced), grad_norm, lr, tokens/s/GPU, TFLOP/s/GPU,
                             per-layer expert max/mean load; val_loss every eval_every steps
    RUN/expert_load.jsonl    tokens routed to each expert of each layer, per logging window
    RUN/tensorboard/         the same scalars (W&B too when train.wandb_project is set)
    RUN/loss.png, RUN/expert_load.png, RUN/expert_load.pt   at the end of the run
    RUN/checkpoints/step_N/  train/state.py
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gptoss_nemo.config.sft import SFTRecipe
from gptoss_nemo.errors import CheckpointError, ConfigError

log = logging.getLogger("gptoss_nemo.sft")


@dataclass
class Prepared:
    recipe: SFTRecipe
    cfg: object  # GptOssConfig
    world: int
    dp: int
    impl: object  # ModelImpl: the implementation that runs (model/impl.py)
    train: list
    valid: list
    data_stats: dict


def prepare(recipe: SFTRecipe) -> Prepared:
    """CPU-only checks and data preparation; raises GptOssNemoError with the fix in the message."""
    from transformers import AutoTokenizer

    from gptoss_nemo.checkpoint.writer import check_writable
    from gptoss_nemo.convert.dist_checkpoint import HF_SUBDIR, quant_format, read_dist_checkpoint_config
    from gptoss_nemo.data.dataset import build_datasets
    from gptoss_nemo.model.impl import resolve_impl
    from gptoss_nemo.parallel.setup import env_world_size
    from gptoss_nemo.tokenizer.o200k_harmony import HARMONY_SPECIAL_TOKENS, PAD

    t = recipe.train
    cfg, meta = read_dist_checkpoint_config(recipe.checkpoint)
    check_writable(t.out_dir)  # checkpoints, logs and plots go there
    if quant_format(meta):
        raise CheckpointError(
            f"checkpoint={recipe.checkpoint} is already quantized ({quant_format(meta)}, by "
            f"{meta['quant'].get('stage')}); "
            "SFT, QAT and PTQ start from a BF16 checkpoint (gptoss-nemo import, or an SFT checkpoint). To continue a "
            "QAT run, run its command again: it resumes from train.out_dir")
    world = env_world_size()
    impl = resolve_impl(recipe.model.impl, layout=recipe.parallel, training=True)
    dp = recipe.check_layout(cfg, world, te=impl.te)
    recipe.memory.check(impl.name, cfg, recipe.parallel)
    check_data_for_impl(recipe.data, recipe.parallel, impl)
    if recipe.data.seq_length > cfg.max_position_embeddings:
        raise ConfigError(f"data.seq_length={recipe.data.seq_length} exceeds the model's max_position_embeddings="
                          f"{cfg.max_position_embeddings}")
    for wanted, module, key in ((t.tensorboard, "tensorboard", "train.tensorboard"),
                                (t.plots, "matplotlib", "train.plots"),
                                (t.wandb_project, "wandb", "train.wandb_project")):
        if wanted and not _importable(module):
            raise ConfigError(f"{key} is set but the `{module}` package is not installed: install it or set "
                              f"{key}={'null' if key.endswith('project') else 'false'}")
    hf = Path(recipe.checkpoint) / HF_SUBDIR
    if not (hf / "tokenizer.json").is_file():
        raise CheckpointError(f"{hf}: no tokenizer.json; import from a Hugging Face checkpoint that has its tokenizer "
                              "files (gptoss-nemo make-tiny writes o200k_harmony's)")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    train, valid, stats = build_datasets(recipe.data, tokenizer, HARMONY_SPECIAL_TOKENS[PAD])
    data_stats = {**stats.summary(), "train_sequences": len(train), "valid_sequences": len(valid)}
    return Prepared(recipe, cfg, world, dp, impl, train, valid, data_stats)


def check_sequence_split(data, parallel, te: bool) -> None:
    """Under TE's spec with tp > 1, sequence parallelism splits every sequence over the TP ranks; context
    parallelism splits it into 2 x cp chunks first (also checked by `plan` and `launch`, for the job's
    implementation)."""
    if parallel.cp > 1 and data.seq_length % (2 * parallel.cp):
        raise ConfigError(f"data.seq_length={data.seq_length} is not divisible by 2 x parallel.cp={parallel.cp}: "
                          "context parallelism gives each CP rank two of 2 x cp equal chunks of every sequence")
    if parallel.cp > 1 and data.packing:
        raise ConfigError("data.packing=true with parallel.cp > 1: context parallelism here takes one conversation "
                          "per sequence (TE's packed-sequence attention under CP needs every document padded to "
                          "2 x cp); set data.packing=false")
    local = data.seq_length // parallel.cp
    if te and parallel.tp > 1 and local % parallel.tp:
        per_rank = f"data.seq_length={data.seq_length}" + (f" / parallel.cp={parallel.cp}" if parallel.cp > 1 else "")
        raise ConfigError(f"{per_rank} is not divisible by parallel.tp={parallel.tp}: with model.impl=te and tp > 1 "
                          "sequence parallelism splits every sequence over the TP ranks")


def check_data_for_impl(data, parallel, impl) -> None:
    """What TE's spec needs of the sequences, before any GPU time (the pipeline's dry run checks it too, before its
    import): with tp > 1, sequence parallelism splits every sequence over the TP ranks; packed documents need THD
    attention, which needs a recent cuDNN (model/impl.py; fused keeps them apart with flex attention)."""
    from gptoss_nemo.model.impl import te_packing_problem

    check_sequence_split(data, parallel, impl.te)
    if not impl.te:
        return
    problem = te_packing_problem() if data.packing else None
    if problem:
        raise ConfigError(f"data.packing=true with model.impl=te: {problem}; set data.packing=false (one conversation "
                          "per sequence), or model.impl=fused (flex attention keeps packed documents apart)")


def dry_run(recipe: SFTRecipe) -> dict:
    """Everything `run_sft` checks before touching a GPU, and the plan it would run: no GPU needed."""
    from gptoss_nemo.plan.memory import estimate, fused_adam_here

    p = prepare(recipe)
    t = recipe.train
    mem, stage = estimate(p.cfg, recipe.parallel, p.world, recipe.data.seq_length, t.micro_batch_size,
                          impl=p.impl.name, qat=getattr(recipe, "quant", None) is not None, savers=recipe.memory,
                          fused_adam=fused_adam_here())
    return {"checkpoint": recipe.checkpoint, "out_dir": t.out_dir, "world_size": p.world,
            "layout": asdict(recipe.parallel), "data_parallel": p.dp,
            "micro_batches_per_step": t.global_batch_size // (t.micro_batch_size * p.dp),
            "tokens_per_step": t.global_batch_size * recipe.data.seq_length, "steps": t.steps, "data": p.data_stats,
            "per_gpu_gib_estimate": mem.gib(), "busiest_stage": stage,
            "impl": {"name": p.impl.name, "why": p.impl.why}}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _restart_logs(out_dir: Path, start: int) -> None:
    """A resumed run logs the steps after `start` again: drop what the interrupted run wrote past it (all of it
    when no checkpoint was complete)."""
    for name in ("metrics.jsonl", "expert_load.jsonl"):
        path = out_dir / name
        if path.is_file():
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line).get("step", 0) <= start] if start else []
            path.write_text("".join(line + "\n" for line in kept))


def _deterministic(on: bool) -> None:
    """Deterministic kernels: cuBLAS's fixed workspace, torch's deterministic algorithms and, under TE, its
    deterministic attention backward (megatron refuses deterministic_mode with TE otherwise)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
        torch.use_deterministic_algorithms(True, warn_only=True)


def run_sft(recipe: SFTRecipe) -> dict:
    """Train; returns {"resumed_from": step or 0, "stopped": whether a stop request ended it early, "last": the
    last step's metrics} (on every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gptoss_nemo.convert.dist_checkpoint import HF_SUBDIR, load_dist_checkpoint
    from gptoss_nemo.model.build import build_rank_model
    from gptoss_nemo.parallel.setup import init_distributed
    from gptoss_nemo.train import checkpoint_dirs
    from gptoss_nemo.train.batches import GlobalBatches
    from gptoss_nemo.train.expert_load import RoutedTokenCounter, summarize, warnings
    from gptoss_nemo.train.metrics_log import MetricsLog, read_metrics
    from gptoss_nemo.train.state import load_training, save_training
    from gptoss_nemo.train.step import aux_losses, build_training, evaluate, throughput, train_step
    from gptoss_nemo.train.stop import stop_file, stop_requested

    p = prepare(recipe)
    t, cfg, seq = recipe.train, p.cfg, recipe.data.seq_length
    _deterministic(t.deterministic)
    me = init_distributed(recipe.parallel, seed=t.seed)
    gpt = build_rank_model(cfg, recipe.parallel, recipe.router, impl=p.impl, calculate_per_token_loss=True,
                           deterministic_mode=t.deterministic, **recipe.memory.transformer_fields())
    load_dist_checkpoint(gpt, recipe.checkpoint)
    counter = RoutedTokenCounter(gpt, cfg.num_local_experts)
    model, optimizer, scheduler = build_training(recipe, gpt)
    quant = getattr(recipe, "quant", None)  # QAT (quantize/qat.py): the same loop on a fake-quantized model
    dp_rank = ps.get_data_parallel_rank()
    train = GlobalBatches(p.train, t.global_batch_size, t.micro_batch_size, dp_rank, p.dp, t.seed)
    valid = GlobalBatches(p.valid or p.train, t.global_batch_size, t.micro_batch_size, dp_rank, p.dp, t.seed)

    out, root = Path(t.out_dir), Path(t.out_dir) / "checkpoints"
    start = checkpoint_dirs.find_latest(root) or 0
    rank0 = me.rank == 0
    step0: dict = {}
    if quant is not None:
        from gptoss_nemo.quantize import qat

        step0 = qat.begin(recipe, model, train, valid, seq, checkpoint_dirs.step_dir(root, start) if start else None,
                          out, rank0)
    if start:
        load_training(root, start, model, optimizer, scheduler)
    metrics = None
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        _restart_logs(out, start)
        (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2, default=str) + "\n")
        metrics = MetricsLog(out, t.tensorboard, t.wandb_project, run_config=asdict(recipe))
        log.info("data: %s; %s from step %d, %d micro-batches per step per data-parallel rank", p.data_stats,
                 "resuming" if start else "starting", start, train.num_microbatches)
    save = dict(keep_last=t.keep_last, cfg=cfg, layout=recipe.parallel, source=str(recipe.checkpoint),
                side_files_from=Path(recipe.checkpoint) / HF_SUBDIR,
                extra=qat.quant_meta(recipe, "qat") if quant is not None else None)
    row: dict = {}
    stopped = False
    if start == 0 and t.eval_every:  # the starting point of the validation curve
        val = evaluate(model, valid, t.eval_batches, seq)
        if metrics is not None:
            metrics.log(0, {**step0, "val_loss": val})
    for step in range(start, t.steps):
        row = train_step(model, optimizer, scheduler, train, step, seq)
        aux = aux_losses(recipe.router, cfg.num_hidden_layers, train.num_microbatches, step + 1)
        row = {"loss": row["lm_loss"] + aux.pop("weighted"), **row, **aux,
               **throughput(cfg, seq, t.global_batch_size, row["seconds"], p.world)}
        if (step + 1) % t.log_every == 0:
            counts = counter.take()
            loads = summarize(counts)
            for layer in loads:
                row[f"expert_max_over_mean/layer_{layer.layer}"] = layer.max_over_mean
            for line in warnings(loads, t.expert_max_share):
                if rank0:
                    log.warning("step %d: %s", step + 1, line)
            if rank0:
                with (out / "expert_load.jsonl").open("a") as f:
                    f.write(json.dumps({"step": step + 1, "tokens": counts.long().tolist()}) + "\n")
        if t.eval_every and (step + 1) % t.eval_every == 0 or step + 1 == t.steps:
            row["val_loss"] = evaluate(model, valid, t.eval_batches, seq)
        if metrics is not None:
            metrics.log(step + 1, row)
            log.info("step %d: %s", step + 1, {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()
                                               if not k.startswith("expert_max")})
        saved = (step + 1) % t.save_every == 0 or step + 1 == t.steps
        if saved:
            save_training(root, step + 1, model, optimizer, scheduler, **save)
        row["step"] = step + 1
        if step + 1 < t.steps and stop_requested(stop_file(), "cuda"):
            if not saved:
                save_training(root, step + 1, model, optimizer, scheduler, **save)
            stopped = True
            if rank0:
                log.warning("stop requested (%s): checkpointed step %d; the same command resumes from it",
                            stop_file(), step + 1)
            break
    if quant is not None:
        qat.end(model, out, rank0)
    if metrics is not None:
        metrics.close()
        windows = read_metrics(out / "expert_load.jsonl") if (out / "expert_load.jsonl").is_file() else []
        load_total = torch.tensor([w["tokens"] for w in windows]).sum(dim=0) if windows else torch.zeros(
            cfg.num_hidden_layers, cfg.num_local_experts)
        torch.save(load_total, out / "expert_load.pt")
        if t.plots:
            from gptoss_nemo.train.plots import plot_expert_load, plot_losses

            plot_losses(read_metrics(metrics.jsonl), out / "loss.png")
            plot_expert_load(load_total, out / "expert_load.png")
    dist.barrier()
    return {"resumed_from": start, "stopped": stopped, "last": row}
