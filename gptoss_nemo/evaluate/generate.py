"""Prompts in harmony for greedy generation, and the final answer out of what the model generated.

The prompt is the conversation up to (not including) its last assistant message, followed by `<|start|>assistant`;
the model then writes its analysis and final messages. Generation stops at `<|return|>` (end of the final
answer), `<|call|>` (a tool call) or `<|endoftext|>`.
"""

from __future__ import annotations

import re

from gptoss_nemo.data.conversation import Conversation
from gptoss_nemo.data.harmony import RenderOptions, render
from gptoss_nemo.errors import DataError
from gptoss_nemo.tokenizer.o200k_harmony import GENERATION_EOS_IDS

_FINAL = re.compile(r"<\|channel\|>final<\|message\|>(.*?)(?:<\|return\|>|<\|end\|>|<\|call\|>|$)", re.S)


def prompt_text(conv: Conversation, opts: RenderOptions = RenderOptions()) -> str:
    if not conv.messages or conv.messages[-1].role != "assistant":
        raise DataError("an evaluation conversation must end with the assistant answer it is checked against")
    text, _ = render(Conversation(conv.messages[:-1], conv.tools), opts)
    return text + "<|start|>assistant"


def final_answer(generated: str) -> str:
    """The final-channel text of the generated continuation ('' when the model wrote none)."""
    found = _FINAL.findall(generated)
    return found[-1].strip() if found else ""


def greedy(model, input_ids, max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt (transformers model), stopping at harmony's end-of-answer tokens."""
    import torch

    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=GENERATION_EOS_IDS, pad_token_id=GENERATION_EOS_IDS[1])
    return out[0, input_ids.shape[1]:].tolist()
