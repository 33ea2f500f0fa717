"""Harmony rendering of training conversations: the same text as the chat template and openai-harmony, the loss
mask on exactly what the model writes, and one clear message per malformed conversation."""

import openai_harmony as oh
import pytest
from transformers import AutoTokenizer

from test_tokenizer import _harmony_conversation

from gptoss_nemo.data.conversation import parse_conversation
from gptoss_nemo.data.harmony import RenderOptions, encode, render
from gptoss_nemo.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok(tiny_mxfp4):
    return AutoTokenizer.from_pretrained(tiny_mxfp4)


def _loss_text(tok, conv, **opts) -> str:
    ids, mask = encode(parse_conversation(conv), tok, RenderOptions(**opts))
    return tok.decode([i for i, m in zip(ids, mask) if m])


MULTI_TURN = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": "Use metric units."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "thinking": "old thought", "content": "hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "thinking": "2+2=4", "content": "4"},
]}


def test_tool_conversation_matches_openai_harmony_and_template(tok, harmony):
    hm, hf, tools = _harmony_conversation()
    expected = harmony.render_conversation_for_training(
        oh.Conversation.from_messages(hm), oh.RenderConversationConfig(auto_drop_analysis=False))
    opts = RenderOptions(reasoning_effort="high", current_date="2026-11-22")
    conv = parse_conversation({"messages": hf, "tools": tools})
    text, _ = render(conv, opts)
    assert text == tok.apply_chat_template(hf, tools=tools, tokenize=False, reasoning_effort="high",
                                           current_date="2026-11-22")
    ids, _ = encode(conv, tok, opts)
    assert ids == expected


def test_multi_turn_matches_template_and_drops_old_thinking(tok):
    text, _ = render(parse_conversation(MULTI_TURN))
    assert text == tok.apply_chat_template(MULTI_TURN["messages"], tokenize=False)
    assert "old thought" not in text and "# Instructions\n\nBe brief.\n\nUse metric units." in text


def test_loss_mask_covers_what_the_model_writes(tok):
    assert _loss_text(tok, MULTI_TURN) == (
        "<|channel|>final<|message|>hello<|end|>"
        "<|channel|>analysis<|message|>2+2=4<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert _loss_text(tok, MULTI_TURN, loss_on="last_turn") == (
        "<|channel|>analysis<|message|>2+2=4<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert _loss_text(tok, MULTI_TURN, loss_on="final") == (
        "<|channel|>final<|message|>hello<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>")


def test_loss_mask_with_tool_calls(tok):
    _, hf, tools = _harmony_conversation()
    got = _loss_text(tok, {"messages": hf, "tools": tools})
    assert got == (
        "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
        '{"location":"SF"}<|call|>'
        "<|channel|>analysis<|message|>It is 20 C.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>20 C and sunny.<|return|>")
    assert "temp" not in got and "Weather in SF" not in got  # tool results and user text are context only


@pytest.mark.parametrize("record,message", [
    ([], 'expected an object with a "messages" list'),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\].role is 'bot'; use one of system"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "needs content, thinking or tool_calls"),
    ({"messages": [{"role": "user", "content": "a<|end|>b"}, {"role": "assistant", "content": "x"}]},
     r"contains the harmony control token <\|end\|>"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     r"tool_calls\[0\].arguments is not valid JSON"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"name": "f"}]}]}, "not both"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "a tool message needs a name or a preceding assistant tool call"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}]},
     "only assistant messages carry tool_calls"),
])
def test_malformed_conversations_say_what_is_wrong(record, message):
    with pytest.raises(DataError, match=message):
        parse_conversation(record)


def test_bad_render_options():
    with pytest.raises(ConfigError, match="data.loss_on='everything'"):
        RenderOptions(loss_on="everything")
