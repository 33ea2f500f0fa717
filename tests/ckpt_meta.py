"""Test helper shared by the CPU tests (not collected: no test_ prefix)."""

import json

from gptoss_nemo.checkpoint.hf_layout import copy_side_files
from gptoss_nemo.convert.dist_checkpoint import FORMAT, HF_SUBDIR, META_FILE


def write_ckpt_meta(d, cfg, side_files_from=None, quant: str | None = None):
    """The CPU-readable part of a gptoss-nemo checkpoint (gptoss_nemo.json, hf/ config, side files; no tensors):
    enough for every check made before a GPU is used. `quant`: the metadata of a QAT checkpoint of that format."""
    (d / HF_SUBDIR).mkdir(parents=True)
    meta = {"format": FORMAT, **({"quant": {"format": quant, "stage": "qat"}} if quant else {})}
    (d / META_FILE).write_text(json.dumps(meta))
    cfg.replace(quantized=False).save(d / HF_SUBDIR)
    if side_files_from is not None:
        copy_side_files(side_files_from, d / HF_SUBDIR)
    return d
