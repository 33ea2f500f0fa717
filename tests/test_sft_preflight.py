"""`gptoss-nemo sft` checks everything it can on the CPU, before any GPU time: one message naming problem and fix,
nothing written. And `prepare` turns a valid recipe into packed, tokenized training data."""

import json
import shutil
from pathlib import Path

import pytest

from gptoss_nemo.cli import main
from gptoss_nemo.config.load import load_recipe
from gptoss_nemo.config.sft import SFTRecipe
from gptoss_nemo.convert.dist_checkpoint import HF_SUBDIR
from gptoss_nemo.train.sft import prepare

RECIPE = Path(__file__).parents[1] / "recipes" / "sft_tiny.yaml"


@pytest.fixture
def ckpt(tiny_ckpt_meta):
    return tiny_ckpt_meta


def _args(ckpt, tmp_path, *overrides):
    return ["sft", str(RECIPE), f"checkpoint={ckpt}", f"train.out_dir={tmp_path / 'run'}",
            "data.train=[synthetic:arithmetic:64]", *overrides, "--local-spec"]


def _error(argv, capsys, monkeypatch, world=1) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_prepare_packs_the_synthetic_task(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = load_recipe(SFTRecipe, RECIPE, [f"checkpoint={ckpt}", "data.train=[synthetic:arithmetic:400]",
                                             "parallel.ep=2", "train.tensorboard=false", "train.plots=false"])
    p = prepare(recipe)
    assert p.world == 2 and p.dp == 2
    assert p.data_stats["lines"] == 400 and p.data_stats["bad"] == 0
    assert p.data_stats["kept"] == 400 and p.valid and p.train
    assert all(s.tokens.shape == (512,) for s in p.train)
    assert 0 < p.data_stats["loss_tokens"] < p.data_stats["tokens"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.ep=3"], 3, "num_local_experts=8 is not divisible by ep=3"),
    (["parallel.tp=2"], 2, "training with tp>1 needs Transformer Engine"),
    (["parallel.ep=2", "train.global_batch_size=6", "train.micro_batch_size=2"], 2,
     "train.global_batch_size=6 is not a multiple of train.micro_batch_size=2 x data-parallel size 2"),
    (["data.seq_length=200000"], 1, "data.seq_length=200000 exceeds the model's max_position_embeddings"),
    (["train.stepz=3"], 1, "train.stepz is not a field of TrainConfig"),
    (["router.load_balancing_type=none"], 1, "router.load_balancing_type='none'"),
])
def test_bad_recipes(ckpt, tmp_path, capsys, monkeypatch, overrides, world, message):
    assert message in _error(_args(ckpt, tmp_path, *overrides), capsys, monkeypatch, world)
    assert not (tmp_path / "run").exists()


def test_bad_checkpoints(ckpt, tiny_mxfp4, tmp_path, capsys, monkeypatch):
    err = _error(_args(tiny_mxfp4, tmp_path), capsys, monkeypatch)
    assert "not a gptoss-nemo checkpoint" in err and "gptoss-nemo import" in err
    assert "not a gptoss-nemo checkpoint" in _error(_args(tmp_path / "nowhere", tmp_path), capsys, monkeypatch)
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / HF_SUBDIR / "tokenizer.json").unlink()
    assert "no tokenizer.json" in _error(_args(bare, tmp_path), capsys, monkeypatch)
    assert not (tmp_path / "run").exists()


def test_bad_data(ckpt, tmp_path, capsys, monkeypatch):
    data = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data.write_text(good + "\n" + '{"messages": [{"role": "user"' + "\n" + good + "\n")
    err = _error(_args(ckpt, tmp_path, f"data.train=[{data}]"), capsys, monkeypatch)
    assert f"{data}:2" in err and "data.max_bad_fraction" in err
    missing = tmp_path / "missing.jsonl"
    assert f"{missing}: no such data file" in _error(_args(ckpt, tmp_path, f"data.train=[{missing}]"), capsys,
                                                    monkeypatch)
    assert not (tmp_path / "run").exists()


def test_missing_logging_backend(ckpt, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    err = _error(_args(ckpt, tmp_path, "train.tensorboard=false"), capsys, monkeypatch)
    assert "train.plots is set but the `matplotlib` package is not installed" in err
