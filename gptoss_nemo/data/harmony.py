"""Render a conversation in OpenAI's harmony format and mark the tokens the loss is taken on.

The text is exactly what `tokenizer/chat_template.jinja` renders for the same messages (and what openai-harmony's
`render_conversation_for_training` gives; both are checked in tests/test_data_render.py):

    <|start|>system<|message|>{identity, knowledge cutoff, date, reasoning effort, channels}<|end|>
    <|start|>developer<|message|># Instructions\n\n{system + developer messages}{# Tools ...}<|end|>
    <|start|>user<|message|>{content}<|end|>
    <|start|>assistant<|channel|>analysis<|message|>{thinking}<|end|>            (only after the last user turn)
    <|start|>assistant to=functions.{f}<|channel|>commentary <|constrain|>json<|message|>{args}<|call|>
    <|start|>functions.{f} to=assistant<|channel|>commentary<|message|>{result}<|end|>
    <|start|>assistant<|channel|>final<|message|>{content}<|return|>             (<|end|> unless it is the last)

Loss spans cover what the model itself writes at inference, where the prompt ends in `<|start|>assistant`: from
after that header (or from `<|start|>` for a second assistant message in a row) through the closing token.
`loss_on`: "assistant" (every assistant message), "final" (final-channel messages only), "last_turn" (assistant
messages after the last user message).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_nemo.data.conversation import Conversation
from gptoss_nemo.errors import ConfigError

LOSS_ON = ("assistant", "final", "last_turn")
EFFORTS = ("low", "medium", "high")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."


@dataclass(frozen=True, slots=True)
class RenderOptions:
    loss_on: str = "assistant"
    reasoning_effort: str = "medium"
    model_identity: str = DEFAULT_IDENTITY
    current_date: str | None = None

    def __post_init__(self):
        if self.loss_on not in LOSS_ON:
            raise ConfigError(f"data.loss_on={self.loss_on!r}; use one of {', '.join(LOSS_ON)}")
        if self.reasoning_effort not in EFFORTS:
            raise ConfigError(f"data.reasoning_effort={self.reasoning_effort!r}; use one of {', '.join(EFFORTS)}")


def _ts_type(p: dict) -> str:
    if "enum" in p:
        return " | ".join(f'"{v}"' for v in p["enum"])
    t = p.get("type")
    if t == "string":
        return "string"
    if t in ("number", "integer"):
        return "number"
    if t == "boolean":
        return "boolean"
    if t == "array" and "items" in p:
        return _ts_type(p["items"]) + "[]"
    return "any"


def _tools_block(tools) -> str:
    out = "# Tools\n\n## functions\n\nnamespace functions {\n\n"
    for t in tools:
        f = t.get("function", t)
        out += f"// {f.get('description', '')}\ntype {f['name']} = "
        params = f.get("parameters") or {}
        props = params.get("properties") or {}
        if props:
            out += "(_: {\n"
            for name, p in props.items():
                if "description" in p:
                    out += f"// {p['description']}\n"
                optional = "" if name in (params.get("required") or []) else "?"
                out += f"{name}{optional}: {_ts_type(p)},\n"
            out += "}) => any;\n\n"
        else:
            out += "() => any;\n\n"
    return out + "} // namespace functions"


def _system(opts: RenderOptions, tools) -> str:
    s = f"{opts.model_identity}\nKnowledge cutoff: 2024-06"
    if opts.current_date:
        s += f"\nCurrent date: {opts.current_date}"
    s += f"\n\nReasoning: {opts.reasoning_effort}\n\n"
    s += "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    if tools:
        s += "\nCalls to these tools must go to the commentary channel: 'functions'."
    return s


def render(conv: Conversation, opts: RenderOptions = RenderOptions()) -> tuple[str, list[tuple[int, int]]]:
    """The harmony text of `conv` and the [start, end) character spans the loss is taken on."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    size = 0

    def emit(text: str, loss: bool = False) -> None:
        nonlocal size
        if loss and text:
            if spans and spans[-1][1] == size:
                spans[-1] = (spans[-1][0], size + len(text))
            else:
                spans.append((size, size + len(text)))
        parts.append(text)
        size += len(text)

    msgs = conv.messages
    last_user = max((i for i, m in enumerate(msgs) if m.role == "user"), default=-1)
    emit(f"<|start|>system<|message|>{_system(opts, conv.tools)}<|end|>")
    instructions = "\n\n".join(m.content for m in msgs if m.role in ("system", "developer"))
    dev = f"# Instructions\n\n{instructions}" if instructions else ""
    if conv.tools:
        dev += ("\n\n" if dev else "") + _tools_block(conv.tools)
    if dev:
        emit(f"<|start|>developer<|message|>{dev}<|end|>")

    previous_was_assistant = False
    for i, m in enumerate(msgs):
        if m.role == "user":
            emit(f"<|start|>user<|message|>{m.content}<|end|>")
        elif m.role == "tool":
            emit(f"<|start|>functions.{m.name} to=assistant<|channel|>commentary<|message|>{m.content}<|end|>")
        elif m.role == "assistant":
            turn_loss = opts.loss_on != "last_turn" or i > last_user
            pieces = []  # (body after "<|start|>assistant", is_final)
            if m.thinking and i > last_user:
                pieces.append((f"<|channel|>analysis<|message|>{m.thinking}<|end|>", False))
            for call in m.tool_calls:
                pieces.append((f" to=functions.{call.name}<|channel|>commentary <|constrain|>json<|message|>"
                               f"{call.arguments}<|call|>", False))
            if m.content and not m.tool_calls:
                end = "<|return|>" if i == len(msgs) - 1 else "<|end|>"
                pieces.append((f"<|channel|>final<|message|>{m.content}{end}", True))
            for body, is_final in pieces:
                loss = turn_loss and (opts.loss_on != "final" or is_final)
                emit("<|start|>", loss and previous_was_assistant)
                emit("assistant", loss and previous_was_assistant)
                emit(body, loss)
                previous_was_assistant = True
            continue
        previous_was_assistant = False
    return "".join(parts), spans


def encode(conv: Conversation, tokenizer, opts: RenderOptions = RenderOptions()) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether the loss is taken on it (a token counts when it starts inside a span)."""
    text, spans = render(conv, opts)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask, k = [], 0
    for start, _end in enc["offset_mapping"]:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(k < len(spans) and spans[k][0] <= start)
    return enc["input_ids"], mask
