"""Seeded gpt-oss checkpoints with o200k_harmony tokenizer files on GPU machines: the GPU image has no bpe-openai,
so the runs there set $GPTOSS_NEMO_TOKENIZER_DIR to tokenizer files written elsewhere (tokenizer/o200k_harmony.py)."""

import importlib.util
import os
from pathlib import Path

import pytest

from gptoss_nemo.checkpoint.tiny import write_tiny_checkpoint
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.tokenizer.o200k_harmony import TOKENIZER_DIR_ENV


def checkpoint_with_tokenizer(out: Path, cfg: GptOssConfig, seed: int = 1234) -> Path:
    if importlib.util.find_spec("bpe_openai") is None and not os.environ.get(TOKENIZER_DIR_ENV):
        pytest.skip(f"needs bpe-openai or prebuilt tokenizer files in ${TOKENIZER_DIR_ENV}")
    return write_tiny_checkpoint(out, cfg, seed=seed)
