"""`gptoss-nemo eval HF_DIR --data SRC [--data SRC ...] --checker C`: validation loss and pass rate of a Hugging
Face gpt-oss checkpoint (BF16, or MXFP4 dequantized as transformers does), i.e. of what a serving engine gets.

    val_loss    mean cross-entropy over the loss tokens (the same harmony rendering and mask as training)
    pass_rate   greedy generation from the prompt (the conversation up to its last assistant message); the
                final-channel text is judged by the checker against the record (evaluate/checkers.py)

Runs on a GPU when one is visible, else on the CPU (the tiny model takes seconds). A gptoss-nemo (megatron)
checkpoint (BF16 SFT, PTQ or QAT) is first exported in this process into a temporary directory, as `gptoss-nemo
export CKPT OUT --format bf16` writes it (a GPU is needed for that): a quantized checkpoint's experts are its
fake-quantized weights, which is exactly what its MXFP4 export dequantizes to. Checkpoints with quantized
activations (nvfp4_w4a4) are refused: transformers would run their activations in BF16.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from gptoss_nemo.checkpoint.hf_layout import check_checkpoint
from gptoss_nemo.data.conversation import parse_conversation
from gptoss_nemo.data.dataset import read_records
from gptoss_nemo.data.harmony import RenderOptions, encode
from gptoss_nemo.errors import CheckpointError, DataError
from gptoss_nemo.evaluate.checkers import get_checker
from gptoss_nemo.evaluate.generate import final_answer, greedy, prompt_text
from gptoss_nemo.model.hf_config import GptOssConfig


def check_records(sources: list[str], samples: int) -> list[tuple[str, dict, object]]:
    out = []
    for source in sources:
        for where, record in read_records(source):
            if isinstance(record, DataError):
                raise DataError(f"{where}: {record}")
            try:
                out.append((where, record, parse_conversation(record)))
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            if len(out) == samples:
                return out
    if not out:
        raise DataError(f"no conversation in {', '.join(sources)}")
    return out


def check_source(ckpt: str | Path) -> GptOssConfig:
    """A checkpoint `eval` can score (config, tensor headers, tokenizer), checked before any model loads; its
    config."""
    from gptoss_nemo.convert.dist_checkpoint import META_FILE, read_dist_checkpoint_config

    ckpt = Path(ckpt)
    if (ckpt / META_FILE).is_file():
        return read_dist_checkpoint_config(ckpt)[0]
    cfg = check_checkpoint(ckpt)
    if not (ckpt / "tokenizer.json").is_file():
        raise CheckpointError(f"{ckpt}: no tokenizer.json; evaluation renders and tokenizes harmony text")
    return cfg


@contextmanager
def hf_view(ckpt: str | Path, impl: str = "auto") -> Iterator[Path]:
    """A Hugging Face checkpoint as it is; a gptoss-nemo checkpoint exported (BF16, fake-quant experts) into a
    temporary directory for the duration."""
    from gptoss_nemo.convert.dist_checkpoint import META_FILE, quant_format, read_dist_checkpoint_config

    ckpt = Path(ckpt)
    if not (ckpt / META_FILE).is_file():
        yield ckpt
        return
    _, meta = read_dist_checkpoint_config(ckpt)
    if quant_format(meta) == "nvfp4_w4a4":
        raise CheckpointError(f"{ckpt}: quantized with nvfp4_w4a4 (activations too); a Hugging Face model would run "
                              "its activations in BF16, so its numbers would not be the checkpoint's")
    from gptoss_nemo.convert.hf_export import run_export
    from gptoss_nemo.parallel.layout import ParallelLayout
    from gptoss_nemo.parallel.setup import shutdown

    with tempfile.TemporaryDirectory(prefix="gptoss-nemo-eval-") as tmp:
        env = dict(os.environ)
        try:
            out = run_export(ckpt, Path(tmp) / "hf", ParallelLayout(), fmt="bf16", impl=impl)
        finally:
            shutdown()
            os.environ.clear()  # a fresh rendezvous (port) for the next export in this process
            os.environ.update(env)
        yield out


def load_model(ckpt: Path, device: str):
    from transformers import AutoTokenizer, GptOssForCausalLM

    cfg = check_source(ckpt)
    kwargs = {}
    if cfg.quantized:
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = GptOssForCausalLM.from_pretrained(ckpt, dtype=dtype, **kwargs).to(device).eval()
    return model, AutoTokenizer.from_pretrained(ckpt)


def evaluate(ckpt: str | Path, sources: list[str], checker: str, *, samples: int = 64, max_new_tokens: int = 128,
             opts: RenderOptions = RenderOptions(), device: str | None = None, show: int = 3,
             impl: str = "auto") -> dict:
    check = get_checker(checker)
    records = check_records(sources, samples)  # bad input fails before the model is loaded
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with hf_view(ckpt, impl) as hf:
        model, tokenizer = load_model(hf, device)
    loss_sum, loss_tokens, passed, examples = 0.0, 0, 0, []
    for where, record, conv in records:
        ids, mask = encode(conv, tokenizer, opts)
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            logits = model(x).logits[0, :-1].float()
        on = torch.tensor(mask[1:], device=device)  # logits at j predict token j + 1
        ce = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        loss_sum += ce[on].sum().item()
        loss_tokens += int(on.sum())
        prompt = tokenizer(prompt_text(conv, opts), add_special_tokens=False, return_tensors="pt").input_ids
        reply = final_answer(tokenizer.decode(greedy(model, prompt.to(device), max_new_tokens),
                                              skip_special_tokens=False))
        ok = bool(check(record, reply))
        passed += ok
        if len(examples) < show:
            examples.append({"where": where, "reply": reply[:200], "passed": ok})
    return {"checkpoint": str(ckpt), "checker": checker, "samples": len(records), "device": device,
            "val_loss": loss_sum / max(loss_tokens, 1), "loss_tokens": loss_tokens, "passed": passed,
            "pass_rate": passed / len(records), "examples": examples}


def table(rows: list[dict]) -> str:
    """A plain-text table of evaluation results (one row per checkpoint)."""
    head = f"{'checkpoint':<48} {'samples':>7} {'val loss':>9} {'pass rate':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['checkpoint'][-48:]:<48} {r['samples']:>7} {r['val_loss']:>9.4f} {r['pass_rate']:>9.1%}")
    return "\n".join(lines)
