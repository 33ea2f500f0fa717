"""`gptoss-nemo qat RECIPE` and `gptoss-nemo ptq RECIPE`: ModelOpt fake quantization of the expert MLPs on the
megatron model, then (QAT) the SFT loop at a low learning rate, the router still training with its aux loss.

QAT is the SFT loop (train/sft.py) with two hooks from here:
  * `begin`, once the model is wrapped for training: a fresh run measures the BF16 validation loss, quantizes
    (calibrating on the first `quant.calibration_batches` training batches when the format needs it) and logs the
    expert weights' quantization error; a resumed run restores the quantizers of its checkpoint instead, before
    the checkpoint's weights and optimizer state load;
  * `end`: the quantization error again, after training.
    RUN/quant_error.json     {"format", "before": [per layer], "after": [per layer]} (quantize/quant_error.py)
    RUN/metrics.jsonl        step 0: val_loss_bf16 (before quantization), val_loss (quantized: the PTQ value)

PTQ quantizes the same way and trains nothing: it writes a quantized checkpoint (RUN/checkpoint) and prints the
validation loss before and after quantization.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gptoss_nemo.config.qat import QATRecipe
from gptoss_nemo.convert.hf_to_megatron import unwrap
from gptoss_nemo.quantize import modelopt_state
from gptoss_nemo.quantize.quant_error import expert_quant_error

log = logging.getLogger("gptoss_nemo.qat")
ERROR_FILE = "quant_error.json"


def quant_meta(recipe: QATRecipe, stage: str) -> dict:
    return {"quant": {"format": recipe.quant.format, "stage": stage}}


def _calibration(recipe: QATRecipe, model, batches, seq: int):
    from gptoss_nemo.train.step import run_global_batch

    def forward_loop() -> None:
        model.eval()
        for step in range(min(recipe.quant.calibration_batches, len(batches))):
            run_global_batch(model, batches, step, seq, forward_only=True)
        model.train()
    return forward_loop


def quantize_model(recipe: QATRecipe, model, train, seq: int) -> list[dict]:
    """Collective: quantize the wrapped model in place; returns the quantization error per layer."""
    modelopt_state.quantize(unwrap(model), recipe.quant.format, _calibration(recipe, model, train, seq))
    return expert_quant_error(unwrap(model), model_layers(model))


def model_layers(model) -> int:
    return unwrap(model).config.num_layers


def begin(recipe: QATRecipe, model, train, valid, seq: int, resume_dir: Path | None, out: Path,
          rank0: bool) -> dict:
    """Collective. Returns what step 0 logs ({} when resuming)."""
    from gptoss_nemo.train.step import evaluate

    if resume_dir is not None:
        modelopt_state.restore(unwrap(model), resume_dir)
        return {}
    t = recipe.train
    row = {"val_loss_bf16": evaluate(model, valid, t.eval_batches, seq)} if t.eval_every else {}
    before = quantize_model(recipe, model, train, seq)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / ERROR_FILE).write_text(json.dumps({"format": recipe.quant.format, "before": before}, indent=1) + "\n")
        log.info("quantized the experts to %s; error before QAT: %s", recipe.quant.format, _short(before))
    return row


def end(model, out: Path, rank0: bool) -> list[dict]:
    """Collective: the quantization error after training, added to RUN/quant_error.json."""
    after = expert_quant_error(unwrap(model), model_layers(model))
    if rank0:
        path = out / ERROR_FILE
        data = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**data, "after": after}, indent=1) + "\n")
        log.info("quantization error after QAT: %s", _short(after))
    return after


def _short(rows: list[dict]) -> str:
    return "; ".join(f"layer {r['layer']}: mean {r['mean_rel']:.4f} max {r['max_rel']:.3f} l2 {r['l2_rel']:.4f}"
                     for r in rows)


def run_ptq(recipe: QATRecipe) -> dict:
    """Quantize an SFT checkpoint without training: RUN/checkpoint (a quantized gptoss-nemo checkpoint, which
    `gptoss-nemo export` and `eval` read), RUN/quant_error.json; returns the validation losses."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    from gptoss_nemo.checkpoint.writer import check_target
    from gptoss_nemo.convert.dist_checkpoint import HF_SUBDIR, load_dist_checkpoint, save_dist_checkpoint
    from gptoss_nemo.model.build import build_rank_model
    from gptoss_nemo.parallel.setup import init_distributed
    from gptoss_nemo.train.batches import GlobalBatches
    from gptoss_nemo.train.sft import prepare
    from gptoss_nemo.train.step import evaluate

    p = prepare(recipe)
    t, seq, out = recipe.train, recipe.data.seq_length, Path(recipe.train.out_dir)
    target = out / "checkpoint"
    check_target(target, overwrite=False)
    me = init_distributed(recipe.parallel, seed=t.seed)
    gpt = build_rank_model(p.cfg, recipe.parallel, recipe.router, impl=p.impl, calculate_per_token_loss=True,
                           **recipe.memory.transformer_fields())
    load_dist_checkpoint(gpt, recipe.checkpoint)
    model = Float16Module(gpt.config, gpt)
    dp_rank = ps.get_data_parallel_rank()
    train = GlobalBatches(p.train, t.global_batch_size, t.micro_batch_size, dp_rank, p.dp, t.seed)
    valid = GlobalBatches(p.valid or p.train, t.global_batch_size, t.micro_batch_size, dp_rank, p.dp, t.seed)
    val_bf16 = evaluate(model, valid, t.eval_batches, seq)
    error = quantize_model(recipe, model, train, seq)
    val_quant = evaluate(model, valid, t.eval_batches, seq)
    save_dist_checkpoint(model, target, p.cfg, layout=recipe.parallel, source=str(recipe.checkpoint),
                         side_files_from=Path(recipe.checkpoint) / HF_SUBDIR, extra=quant_meta(recipe, "ptq"))
    summary = {"checkpoint": str(target), "format": recipe.quant.format, "val_loss_bf16": val_bf16,
               "val_loss": val_quant, "quant_error": error}
    if me.rank == 0:
        (out / ERROR_FILE).write_text(json.dumps({"format": recipe.quant.format, "before": error}, indent=1) + "\n")
        (out / "ptq.json").write_text(json.dumps(summary, indent=1) + "\n")
    dist.barrier()
    return summary
