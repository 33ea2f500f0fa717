"""`gptoss-nemo pipeline RECIPE [a.b=c ...] [--only STAGE] [--dry-run]`: import -> SFT -> PTQ -> QAT -> export
-> eval in one command (torchrun / srun like every stage), each stage skipped when its complete output exists,
so running the same command again after a failure, a stop or a preemption continues where it ended.

    stage    output (complete = exists: every writer renames into place at the end)
    hf       RUN/hf-tiny                       (model.make_tiny only)
    import   RUN/import                        gptoss-nemo import
    sft      RUN/sft/checkpoints/step_<steps>  gptoss-nemo sft (resumes from its newest checkpoint)
    ptq      RUN/ptq/checkpoint                gptoss-nemo ptq (when `ptq: true`)
    qat      RUN/qat/checkpoints/step_<steps>  gptoss-nemo qat (when `qat.enabled`)
    export   RUN/export/<format>               gptoss-nemo export of the last stage (QAT, else SFT)
    eval     RUN/eval.json                     gptoss-nemo eval of original / SFT / PTQ / QAT (their BF16
                                               exports in RUN/eval/, fake-quantized weights for PTQ and QAT)

`--dry-run` checks everything that can be checked without a GPU (recipe, checkpoint, layout against the world
size, batch splits, every data line, the eval data and checker) and prints the plan with each stage's status.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from gptoss_nemo.config.load import stage_keys
from gptoss_nemo.config.pipeline import PipelineRecipe

log = logging.getLogger("gptoss_nemo.pipeline")
STAGES = ("hf", "import", "sft", "ptq", "qat", "export", "eval")
SECTIONS = {"sft": "sft", "ptq": "qat", "qat": "qat"}  # the recipe section holding a stage's train/optimizer/quant


def outputs(recipe: PipelineRecipe) -> dict[str, list[Path]]:
    """Each stage's complete outputs ([] when the recipe turns it off)."""
    root = recipe.root
    return {
        "hf": [recipe.hf_dir] if recipe.model.make_tiny else [],
        "import": [root / "import"],
        "sft": [recipe.sft_final()],
        "ptq": [root / "ptq" / "checkpoint"] if recipe.ptq else [],
        "qat": [recipe.qat_final()] if recipe.qat.enabled else [],
        "export": [root / "export" / fmt for fmt in recipe.export],
        "eval": [root / "eval.json"] if recipe.eval.enabled else [],
    }


def status(recipe: PipelineRecipe) -> dict[str, str]:
    return {stage: "off" if not paths else "done" if all(p.exists() for p in paths) else "to run"
            for stage, paths in outputs(recipe).items()}


def hf_config(recipe: PipelineRecipe):
    from gptoss_nemo.checkpoint.hf_layout import check_checkpoint
    from gptoss_nemo.model.presets import tiny

    if recipe.model.make_tiny and not recipe.hf_dir.exists():
        return tiny()
    return check_checkpoint(recipe.hf_dir)


def dry_run(recipe: PipelineRecipe, data: bool = True) -> dict:
    """Every check that needs no GPU, and the plan. data=False leaves out reading and tokenizing the training
    data (the SFT / PTQ / QAT stages check it themselves before their GPU work). The implementation is resolved
    here once (model/impl.py); `recipe.model.impl` then names it for every stage."""
    from gptoss_nemo.checkpoint.writer import check_writable
    from gptoss_nemo.data.dataset import build_datasets
    from gptoss_nemo.evaluate.hf_eval import check_records
    from gptoss_nemo.model.impl import resolve_impl
    from gptoss_nemo.parallel.setup import env_world_size
    from gptoss_nemo.plan.memory import estimate, fused_adam_here
    from gptoss_nemo.tokenizer.o200k_harmony import HARMONY_SPECIAL_TOKENS, PAD, hf_tokenizer
    from gptoss_nemo.train.sft import check_data_for_impl

    check_writable(recipe.root)  # every stage writes under it
    cfg, world = hf_config(recipe), env_world_size()
    impl = resolve_impl(recipe.model.impl, layout=recipe.parallel, training=True)
    recipe.model.impl = impl.name
    stages = [("sft", recipe.sft_recipe())] + ([("qat", recipe.qat_recipe())] if recipe.qat.enabled else [])
    for name, stage_recipe in stages:
        with stage_keys(name):
            dp = stage_recipe.check_layout(cfg, world, te=impl.te)
            stage_recipe.memory.check(impl.name, cfg, recipe.parallel)
    check_data_for_impl(recipe.data, recipe.parallel, impl)
    check_records(recipe.eval.data, recipe.eval.samples)
    t = recipe.sft.train
    name, busiest = stages[-1]  # the QAT stage holds the most (the fake-quantized experts), when it runs
    mem, stage = estimate(cfg, recipe.parallel, world, recipe.data.seq_length, busiest.train.micro_batch_size,
                          impl=impl.name, qat=name == "qat", savers=busiest.memory, fused_adam=fused_adam_here())
    plan = {"run_dir": str(recipe.root), "world_size": world, "data_parallel": dp, "layout": asdict(recipe.parallel),
            "stages": status(recipe), "tokens_per_step": t.global_batch_size * recipe.data.seq_length,
            "per_gpu_gib_estimate": mem.gib(), "busiest_stage": stage, "impl": {"name": impl.name, "why": impl.why}}
    if data:
        # the checkpoint's tokenizer, o200k_harmony's where the tiny model is not written yet
        train, valid, stats = build_datasets(recipe.data, hf_tokenizer(recipe.hf_dir), HARMONY_SPECIAL_TOKENS[PAD])
        plan["data"] = {"train_sequences": len(train), "valid_sequences": len(valid), **stats.summary()}
    return plan


def _between_stages() -> None:
    """Megatron's parallel groups and the last stage's model go; the process group stays."""
    import torch
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _make_tiny(recipe: PipelineRecipe, rank0: bool) -> None:
    """Rank 0 writes the tiny checkpoint (atomically); the other ranks wait for it to appear."""
    from gptoss_nemo.checkpoint.tiny import write_tiny_checkpoint
    from gptoss_nemo.model.presets import tiny

    if rank0:
        write_tiny_checkpoint(recipe.hf_dir, tiny(), seed=recipe.model.tiny_seed)
        return
    deadline = time.time() + 600
    while not recipe.hf_dir.exists():
        if time.time() > deadline:
            raise TimeoutError(f"rank 0 did not write {recipe.hf_dir} within 10 minutes")
        time.sleep(1)


def run(recipe: PipelineRecipe, only: str | None = None) -> dict:
    """Run the stages that are not done (or only `only`); returns {"stages": status, "eval": rows}."""
    from gptoss_nemo.convert.hf_export import run_export
    from gptoss_nemo.convert.import_hf import run_import
    from gptoss_nemo.parallel.setup import env_rank
    from gptoss_nemo.quantize.qat import run_ptq
    from gptoss_nemo.train.sft import run_sft

    rank0 = env_rank() == 0
    todo = {s for s, st in status(recipe).items() if st == "to run" and (only is None or s == only)}
    # every input check first, before any GPU time; the training data only when the tiny model or the import would
    # run before the first stage that reads it
    dry_run(recipe, data=bool(todo & {"hf", "import"}))  # resolves recipe.model.impl for every stage
    impl = recipe.model.impl
    root = recipe.root
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        (root / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2, default=str) + "\n")
    steps = {
        "hf": lambda: _make_tiny(recipe, rank0),
        "import": lambda: run_import(recipe.hf_dir, root / "import", recipe.parallel, impl=impl),
        "sft": lambda: run_sft(recipe.sft_recipe()),
        "ptq": lambda: run_ptq(recipe.qat_recipe("ptq")),
        "qat": lambda: run_sft(recipe.qat_recipe()),
        "export": lambda: [run_export(recipe.qat_final() if recipe.qat.enabled else recipe.sft_final(),
                                      root / "export" / fmt, recipe.parallel, fmt=fmt, impl=impl)
                           for fmt in recipe.export if not (root / "export" / fmt).exists()],
        "eval": lambda: _evaluate(recipe, rank0),
    }
    stopped = None
    for stage in STAGES:
        if stage in todo:
            if rank0:
                log.info("pipeline: stage %s", stage)
            with stage_keys(SECTIONS.get(stage)):  # its recipe errors named as this recipe spells them
                result = steps[stage]()
            _between_stages()
            if isinstance(result, dict) and result.get("stopped"):  # a stop request (time limit, preemption)
                stopped = stage
                if rank0:
                    log.warning("pipeline: %s stopped at a checkpoint; the same command continues from it", stage)
                break
    rows = json.loads((root / "eval.json").read_text()) if (root / "eval.json").is_file() else []
    return {"run_dir": str(root), "stages": status(recipe), "stopped_in": stopped, "eval": rows,
            "export": [str(p) for p in outputs(recipe)["export"]]}


def _eval_rows(recipe: PipelineRecipe) -> dict[str, Path]:
    rows = {"original": recipe.hf_dir, "sft": recipe.sft_final()}
    if recipe.ptq:
        rows[f"ptq_{recipe.qat.quant.format}"] = recipe.root / "ptq" / "checkpoint"
    if recipe.qat.enabled:
        rows[f"qat_{recipe.qat.quant.format}"] = recipe.qat_final()
    return rows


def _evaluate(recipe: PipelineRecipe, rank0: bool) -> None:
    """Every rank exports each gptoss-nemo checkpoint (BF16, fake-quantized weights) to RUN/eval/<row>; rank 0
    scores them with transformers and writes RUN/eval.json."""
    import torch.distributed as dist

    from gptoss_nemo.convert.hf_export import run_export
    from gptoss_nemo.evaluate.hf_eval import evaluate
    from gptoss_nemo.parallel.layout import ParallelLayout

    hf = {}
    for name, ckpt in _eval_rows(recipe).items():
        if name == "original":
            hf[name] = ckpt
            continue
        hf[name] = recipe.root / "eval" / name
        if not hf[name].exists():
            run_export(ckpt, hf[name], ParallelLayout(), fmt="bf16", impl=recipe.model.impl)
            _between_stages()
    if rank0:
        e = recipe.eval
        rows = [{"stage": name, **evaluate(path, e.data, e.checker, samples=e.samples,
                                           max_new_tokens=e.max_new_tokens, opts=recipe.data.render_options())}
                for name, path in hf.items()]
        tmp = recipe.root / "eval.json.partial"
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        os.replace(tmp, recipe.root / "eval.json")
    if dist.is_initialized():
        dist.barrier()
