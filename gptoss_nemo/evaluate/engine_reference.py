"""The reference side of an engine check (evaluate/engine_agreement.py): logits of the same tokens the engine was
asked about, turned into `Position`s beside the engine's answers.

    transformers_logits   GptOssForCausalLM on a Hugging Face export (MXFP4 experts dequantized as transformers
                          does), eager attention with sinks, in the dtype asked for; one forward per sequence
    positions             teacher-forced positions of the sequences and the steps of the engine's greedy
                          continuations (the prompt and the engine's tokens, run through the reference at once:
                          where every step agrees, the reference's own greedy continuation is the engine's)
    fp32_reference_and_noise
                          the FP32 reference of the calibrated (near-tie) rule, and `Noise`: its BF16 against it on
                          the teacher-forced sequences (one model loaded at a time: BF16 first, then FP32)

`logits(ids) -> [len(ids), vocab]` is any reference: transformers here, the megatron checkpoint's logits in
`verify-export --against`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import torch

from gptoss_nemo.evaluate.engine_agreement import Noise, Position
from gptoss_nemo.evaluate.vllm_engine import ServedRun

Logits = Callable[[list[int]], torch.Tensor]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def transformers_logits(hf_dir: str | Path, dtype: str) -> Logits:
    """A transformers model of the export, as `logits(ids)` (on the GPU when there is one)."""
    from transformers import GptOssForCausalLM

    from gptoss_nemo.checkpoint.hf_layout import check_checkpoint

    kwargs = {}
    if check_checkpoint(hf_dir).quantized:
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    device = {"device_map": "auto"} if torch.cuda.is_available() else {}
    model = GptOssForCausalLM.from_pretrained(hf_dir, dtype=DTYPES[dtype], attn_implementation="eager", **device,
                                              **kwargs).eval()

    @torch.no_grad()
    def logits(ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().cpu()

    return logits


def fp32_reference_and_noise(hf_dir: str | Path, sequences: list[list[int]]) -> tuple[Logits, Noise]:
    """transformers' FP32 on the export (the reference), and what its BF16 does against it on `sequences`."""
    bf16 = transformers_logits(hf_dir, "bfloat16")
    tops = [torch.log_softmax(bf16(seq)[:-1], dim=-1).max(dim=-1) for seq in sequences]
    del bf16  # its model goes with it: one model in memory at a time
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    fp32 = transformers_logits(hf_dir, "float32")
    total, differ, n, largest = 0.0, 0, 0, 0.0
    for seq, (values, tokens) in zip(sequences, tops, strict=True):
        lp = torch.log_softmax(fp32(seq)[:-1], dim=-1)
        top = lp.topk(2)
        total += (values - lp.gather(1, tokens[:, None])[:, 0]).abs().sum().item()
        flipped = tokens != top.indices[:, 0]
        differ += int(flipped.sum())
        n += len(tokens)
        if flipped.any():
            largest = max(largest, float((top.values[:, 0] - top.values[:, 1])[flipped].max()))
    return fp32, Noise(mean_dlogprob=total / max(n, 1), disagreement=differ / max(n, 1), largest_flip_margin=largest)


def _at(logprobs: torch.Tensor, token: int, logprob: float, *, generated: bool, first: bool) -> Position:
    top = logprobs.topk(2)
    return Position(generated=generated, first=first, token=token, logprob=logprob, ref_token=int(top.indices[0]),
                    ref_margin=float(top.values[0] - top.values[1]), ref_logprob=float(logprobs[token]))


def teacher_forced_positions(logits: Logits, sequences: list[list[int]], run: ServedRun) -> list[Position]:
    """Every position j of every sequence (predicting token j + 1): the engine's first token there."""
    out = []
    for seq, tops in zip(sequences, run.teacher_forced, strict=True):
        lp = torch.log_softmax(logits(seq)[:-1], dim=-1)
        if len(tops) != len(lp):
            raise RuntimeError(f"the engine scored {len(tops)} positions of a {len(seq)}-token sequence")
        out += [_at(lp[j], top[0][0], top[0][1], generated=False, first=False) for j, top in enumerate(tops)]
    return out


def generated_positions(logits: Logits, prompts: list[list[int]], run: ServedRun) -> list[Position]:
    """Every step of the engine's greedy continuation of every prompt."""
    out = []
    for prompt, gen in zip(prompts, run.generations, strict=True):
        ids = prompt + gen.tokens[:-1]
        lp = torch.log_softmax(logits(ids)[len(prompt) - 1:], dim=-1)
        out += [_at(lp[i], tok, logprob, generated=True, first=i == 0)
                for i, (tok, logprob) in enumerate(zip(gen.tokens, gen.logprobs, strict=True))]
    return out


def positions(logits: Logits, prompts: list[list[int]], sequences: list[list[int]], run: ServedRun) -> list[Position]:
    return generated_positions(logits, prompts, run) + teacher_forced_positions(logits, sequences, run)
