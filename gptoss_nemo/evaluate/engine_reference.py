"""The reference side of an engine check (evaluate/engine_agreement.py): logits of the same tokens the engine was
asked about, turned into `Position`s beside the engine's answers.

    transformers_logits   GptOssForCausalLM on a Hugging Face export (MXFP4 experts dequantized as transformers
                          does), eager attention with sinks, in the dtype asked for; one forward per sequence
    positions             teacher-forced positions of the sequences and the steps of the engine's greedy
                          continuations (the prompt and the engine's tokens, run through the reference at once:
                          where every step agrees, the reference's own greedy continuation is the engine's)

`logits(ids) -> [len(ids), vocab]` is any reference: transformers here, the megatron checkpoint's logits in
`verify-export --against`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from gptoss_nemo.evaluate.engine_agreement import Position
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
