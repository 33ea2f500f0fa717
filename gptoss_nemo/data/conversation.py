"""One training conversation in the common `messages` form, validated.

    {"messages": [
        {"role": "system", "content": "..."},                      # optional; becomes harmony developer instructions
        {"role": "developer", "content": "..."},                   # optional, same
        {"role": "user", "content": "..."},
        {"role": "assistant", "thinking": "...",                   # analysis channel (optional)
                              "content": "...",                    # final channel
                              "tool_calls": [{"function": {"name": "f", "arguments": {...} or "json"}}]},
        {"role": "tool", "name": "f", "content": "..."}           # result of the preceding call (name optional)
     ],
     "tools": [{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}]}  # optional

`parse_conversation` raises DataError with one sentence saying what is wrong; the dataset reader adds file:line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from gptoss_nemo.errors import DataError

ROLES = ("system", "developer", "user", "assistant", "tool")
# Text that the tokenizer would read as a harmony control token: refused inside message text.
_SPECIAL = re.compile(r"<\|(start|end|message|channel|constrain|return|call|startoftext|endoftext|reserved_\d+)\|>")


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as the model writes it


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str = ""
    thinking: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    name: str = ""  # tool messages: the function that produced it


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    tools: tuple[dict, ...] = field(default=())


def _text(value, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where} must be a string, got {type(value).__name__}")
    bad = _SPECIAL.search(value)
    if bad:
        raise DataError(f"{where} contains the harmony control token {bad.group(0)}; remove or escape it")
    return value


def _tool_call(call, where: str) -> ToolCall:
    if not isinstance(call, dict):
        raise DataError(f"{where} must be an object with a function name and arguments")
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name.isidentifier():
        raise DataError(f"{where} needs a function name that is an identifier, got {name!r}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            json.loads(args)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}.arguments is not valid JSON ({e.msg})") from None
    else:
        args = json.dumps(args, separators=(",", ":"), ensure_ascii=False)
    return ToolCall(name=name, arguments=_text(args, f"{where}.arguments"))


def parse_conversation(record) -> Conversation:
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError('expected an object with a "messages" list')
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise DataError('"messages" must be a non-empty list')
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}.role is {role!r}; use one of {', '.join(ROLES)}")
        calls = m.get("tool_calls") or []
        if calls and role != "assistant":
            raise DataError(f"{where}: only assistant messages carry tool_calls")
        if not isinstance(calls, list):
            raise DataError(f"{where}.tool_calls must be a list")
        msg = Message(
            role=role,
            content=_text(m.get("content"), f"{where}.content"),
            thinking=_text(m.get("thinking"), f"{where}.thinking"),
            tool_calls=tuple(_tool_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls)),
            name=_text(m.get("name"), f"{where}.name"),
        )
        if role == "assistant" and not (msg.content or msg.tool_calls or msg.thinking):
            raise DataError(f"{where}: an assistant message needs content, thinking or tool_calls")
        if role == "assistant" and msg.content and msg.tool_calls:
            raise DataError(f"{where}: an assistant message has either content (final answer) or tool_calls, "
                            "not both; split it in two messages")
        if role == "tool" and not msg.name:
            msg = Message(role="tool", content=msg.content, name=_last_call_name(messages, where))
        messages.append(msg)
    if not any(m.role == "assistant" for m in messages):
        raise DataError("the conversation has no assistant message, so nothing to learn")
    tools = record.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError('"tools" must be a list of function schemas')
    return Conversation(messages=tuple(messages), tools=tuple(tools))


def _last_call_name(previous: list[Message], where: str) -> str:
    for m in reversed(previous):
        if m.tool_calls:
            return m.tool_calls[-1].name
    raise DataError(f"{where}: a tool message needs a name or a preceding assistant tool call")
