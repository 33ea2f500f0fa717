"""o200k_harmony: same ids as bpe-openai's o200k_base, harmony specials as single ids, chat template == harmony."""

import random

import openai_harmony as oh
import pytest
from transformers import AutoTokenizer

from gptoss_nemo.tokenizer.o200k_harmony import HARMONY_SPECIAL_TOKENS, VOCAB_SIZE, all_special_tokens


@pytest.fixture(scope="module")
def tok(tiny_mxfp4):
    return AutoTokenizer.from_pretrained(tiny_mxfp4)


def test_special_tokens_at_official_ids(tok):
    for text, idx in HARMONY_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(text) == idx
        assert tok.encode(text, add_special_tokens=False) == [idx]
    assert len(tok) == VOCAB_SIZE == len(all_special_tokens()) + 199998
    assert tok.convert_tokens_to_ids("<|reserved_201087|>") == 201087
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|return|>", "<|endoftext|>", "<|startoftext|>")


def _corpus(seed: int = 0, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    pieces = ["Hello", " world", "  ", "\n\n", "\t", "123456789", "3.14", "don't", "WE'RE", "naïve", "café", "😀",
              "日本語", "Привет", "مرحبا", "def f(x):\n    return x**2", "{\"a\": [1, 2]}", "  \n ", "ÿ", "\u200b", "—"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def test_same_ids_as_bpe_openai(tok):
    from bpe_openai import get_encoding

    ref = get_encoding("o200k_base")
    for text in _corpus():
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text


def _harmony_conversation():
    tool = oh.ToolDescription.new(
        "get_weather", "Gets the weather.",
        parameters={"type": "object", "required": ["location"], "properties": {
            "location": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["c", "f"]}, "days": {"type": "integer"}}},
    )
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.HIGH).with_conversation_start_date(
        "2026-11-22")
    developer = oh.DeveloperContent.new().with_instructions("Be brief.").with_function_tools([tool])
    M, R = oh.Message, oh.Role
    harmony = [
        M.from_role_and_content(R.SYSTEM, system),
        M.from_role_and_content(R.DEVELOPER, developer),
        M.from_role_and_content(R.USER, "Weather in SF?"),
        M.from_role_and_content(R.ASSISTANT, "Need the weather tool.").with_channel("analysis"),
        M.from_role_and_content(R.ASSISTANT, '{"location":"SF"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        M.from_author_and_content(oh.Author.new(R.TOOL, "functions.get_weather"), '{"temp":20}')
        .with_channel("commentary").with_recipient("assistant"),
        M.from_role_and_content(R.ASSISTANT, "It is 20 C.").with_channel("analysis"),
        M.from_role_and_content(R.ASSISTANT, "20 C and sunny.").with_channel("final"),
    ]
    hf = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in SF?"},
        {"role": "assistant", "thinking": "Need the weather tool.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"location": "SF"}}}]},
        {"role": "tool", "content": '{"temp":20}'},
        {"role": "assistant", "thinking": "It is 20 C.", "content": "20 C and sunny."},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Gets the weather.",
                                               "parameters": tool.parameters}}]
    return harmony, hf, tools


def test_chat_template_matches_openai_harmony(tok, harmony):
    hm, hf, tools = _harmony_conversation()
    expected = harmony.render_conversation_for_training(
        oh.Conversation.from_messages(hm), oh.RenderConversationConfig(auto_drop_analysis=False))
    text = tok.apply_chat_template(hf, tools=tools, tokenize=False, reasoning_effort="high", current_date="2026-11-22")
    assert text == harmony.decode(expected)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == expected  # every harmony special token is one id
    assert tok.decode(ids) == text


def test_generation_prompt_and_dropped_old_analysis(tok, harmony):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "thinking": "old", "content": "yo"},
            {"role": "user", "content": "again"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    M, R = oh.Message, oh.Role
    convo = oh.Conversation.from_messages([
        M.from_role_and_content(R.SYSTEM, oh.SystemContent.new()), M.from_role_and_content(R.USER, "hi"),
        M.from_role_and_content(R.ASSISTANT, "old").with_channel("analysis"),
        M.from_role_and_content(R.ASSISTANT, "yo").with_channel("final"), M.from_role_and_content(R.USER, "again")])
    assert tok.encode(prompt, add_special_tokens=False) == harmony.render_conversation_for_completion(convo, R.ASSISTANT)
    assert "old" not in prompt and prompt.endswith("<|start|>assistant")


def test_prebuilt_tokenizer_dir_is_checked_and_used(tiny_mxfp4, tmp_path, monkeypatch):
    """$GPTOSS_NEMO_TOKENIZER_DIR (images without bpe-openai): a directory save_tokenizer wrote is used as it is;
    a missing file or another tokenizer is refused with the variable's name."""
    import json

    from gptoss_nemo.errors import ConfigError
    from gptoss_nemo.tokenizer import o200k_harmony as oh200k

    monkeypatch.setenv(oh200k.TOKENIZER_DIR_ENV, str(tiny_mxfp4))
    oh200k.build_tokenizer.cache_clear()
    try:
        tok = oh200k.build_tokenizer()
        assert tok.encode("<|start|>user<|message|>2+3").ids[:1] == [200006]
        assert tok.get_vocab_size() == VOCAB_SIZE
        monkeypatch.setenv(oh200k.TOKENIZER_DIR_ENV, str(tmp_path))
        oh200k.build_tokenizer.cache_clear()
        with pytest.raises(ConfigError, match="GPTOSS_NEMO_TOKENIZER_DIR.*does not exist"):
            oh200k.build_tokenizer()
        other = json.loads((tiny_mxfp4 / "tokenizer.json").read_text())
        other["added_tokens"] = [t for t in other["added_tokens"] if t["content"] != "<|start|>"]
        (tmp_path / "tokenizer.json").write_text(json.dumps(other))
        oh200k.build_tokenizer.cache_clear()
        with pytest.raises(ConfigError, match="is not o200k_harmony"):
            oh200k.build_tokenizer()
    finally:
        oh200k.build_tokenizer.cache_clear()
