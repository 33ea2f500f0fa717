"""Issue 22: loading what gptoss-nemo writes prints no "incorrect regex pattern" (transformers' Mistral heuristic).

transformers 4.57.3 to 5.22 (`_patch_mistral_regex`, run for any tokenizer of more than 100000 tokens loaded from a
local directory) read the directory's config.json and warn unless `transformers_version` and `model_type` say it is
not an old Mistral tokenizer. 5.23+ stay silent on a missing version with a non-Mistral model_type, so the installed
transformers alone cannot catch a regression: the rules of the older releases are checked on our config.json too.
"""

import json
import logging
import shutil
import warnings
from contextlib import contextmanager

import pytest
from packaging.version import Version

from gptoss_nemo.model import hf_config
from gptoss_nemo.model.hf_config import GptOssConfig, transformers_version
from gptoss_nemo.model.presets import tiny
from gptoss_nemo.tokenizer.o200k_harmony import save_tokenizer

WARNING = "incorrect regex pattern"
MISTRAL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")


def _old(v):
    return v is not None and v < Version("5.0.0")


# When each release skips its warning for a local directory, given config.json's version (None: no field) and
# model_type, as read in transformers' `_patch_mistral_regex` (4.57.2 warns for every local tokenizer of that size,
# whatever config.json says, and 4.57.1 has no such check).
SKIPS_WARNING = {
    "4.57.3-4.57.6": lambda v, t: (v is not None and v <= Version("4.57.2") and t not in MISTRAL_TYPES)
    or (v is not None and v >= Version("5.0.0")),
    "5.0-5.3": lambda v, t: (v is not None and v <= Version("4.57.2") and t not in MISTRAL_TYPES)
    or (v is not None and v > Version("4.57.3")),
    "5.8-5.22": lambda v, t: (_old(v) and t not in MISTRAL_TYPES) or (v is not None and v >= Version("5.0.0")),
    "5.23+": lambda v, t: ((v is None or _old(v)) and t is not None and t not in MISTRAL_TYPES)
    or (v is not None and v >= Version("5.0.0")),
}


@contextmanager
def regex_warnings():
    """Every message of the transformers logger (at WARNING, whatever TRANSFORMERS_VERBOSITY says) and of
    `warnings` that names the incorrect regex pattern."""
    from transformers.utils import logging as hf_logging

    found = []

    class Collect(logging.Handler):
        def emit(self, record):
            found.append(record.getMessage())

    handler, old_level = Collect(level=logging.DEBUG), hf_logging.get_verbosity()
    root = logging.getLogger("transformers")
    hf_logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        found.extend(str(w.message) for w in caught)
    finally:
        root.removeHandler(handler)
        hf_logging.set_verbosity(old_level)
    found[:] = [m for m in found if WARNING in m]


def _load(path):
    from transformers import AutoTokenizer

    with regex_warnings() as found:
        tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) > 100000  # the size that makes transformers run its Mistral check at all
    return found


@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(out)
    return out


def test_capture_sees_the_warning(tmp_path, tokenizer_only):
    """The control: the installed transformers does warn for our tokenizer next to a version-less Mistral config."""
    for f in tokenizer_only.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert len(_load(tmp_path)) == 1


def test_make_tiny_and_tokenizer_dir_load_without_regex_warning(tiny_mxfp4, tokenizer_only):
    assert _load(tiny_mxfp4) == []
    assert _load(tokenizer_only) == []  # no config.json (the pipeline's preflight loads such a directory)


@pytest.mark.parametrize("release", sorted(SKIPS_WARNING))
def test_config_json_passes_each_releases_check(tiny_mxfp4, release):
    raw = json.loads((tiny_mxfp4 / "config.json").read_text())
    stated = raw.get("transformers_version")
    assert SKIPS_WARNING[release](Version(stated) if stated else None, raw.get("model_type")), (release, stated)


def test_old_config_json_would_warn():
    """Without the field (before issue 22) the rules above fail: the parametrized test can catch a regression."""
    raw = {k: v for k, v in tiny().to_dict().items() if k != "transformers_version"}
    assert [r for r, skips in SKIPS_WARNING.items() if not skips(None, raw["model_type"])] == [
        "4.57.3-4.57.6", "5.0-5.3", "5.8-5.22"]


def test_written_version_is_installed_transformers_and_round_trips(tiny_mxfp4):
    from importlib.metadata import version

    raw = json.loads((tiny_mxfp4 / "config.json").read_text())
    assert raw["transformers_version"] == transformers_version() == version("transformers")
    assert json.loads((tiny_mxfp4 / "generation_config.json").read_text())["transformers_version"] == version(
        "transformers")
    assert GptOssConfig.from_dict(raw) == GptOssConfig.from_file(tiny_mxfp4)


@pytest.mark.parametrize(
    "installed,written",
    [("5.17.0", "5.17.0"), ("5.25.0", "5.25.0"), ("4.57.6", "5.0.0"), ("5.0.0.dev0", "5.0.0"), ("5.0.0rc1", "5.0.0"),
     ("not-a-version", "5.0.0"), (None, "5.0.0")],
)
def test_version_is_never_one_that_warns(monkeypatch, installed, written):
    from importlib import metadata

    def fake(name):
        if installed is None:
            raise metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(metadata, "version", fake)
    got = hf_config.transformers_version.__wrapped__()
    assert got == written
    assert all(skips(Version(got), "gpt_oss") for skips in SKIPS_WARNING.values())
