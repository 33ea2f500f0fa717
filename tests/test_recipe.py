"""Recipes: YAML + a.b=c overrides -> typed sections; every mistake names its dotted key."""

from pathlib import Path

import pytest

from gptoss_nemo.errors import ConfigError
from gptoss_nemo.config.load import load_recipe
from gptoss_nemo.config.sft import SFTRecipe

TINY = Path(__file__).parent.parent / "recipes" / "sft_tiny.yaml"


def test_shipped_recipe_loads_with_overrides():
    r = load_recipe(SFTRecipe, TINY, ["train.steps=50", "parallel.ep=2", "router.aux_loss_coeff=0.01",
                                      "data.train=[a.jsonl,b.jsonl]"])
    assert r.train.steps == 50 and r.parallel.ep == 2 and r.router.aux_loss_coeff == 0.01
    assert r.data.train == ["a.jsonl", "b.jsonl"] and r.data.seq_length == 512 and r.optimizer.lr == 3e-4


@pytest.mark.parametrize("override,message", [
    ("train.stepz=5", "train.stepz is not a field of TrainConfig"),
    ("train.steps=many", "train.steps must be int, got 'many'"),
    ("train.steps=0", "train.steps=0 must be >= 1"),
    ("router.load_balancing_type=none", "router.load_balancing_type='none'"),
    ("parallel=3", "parallel must be a mapping"),
    ("data.loss_on=everything", "data.loss_on='everything'"),
    ("train.global_batch_size=6", "train.global_batch_size=6 is not a multiple of train.micro_batch_size=4"),
    ("steps", "override 'steps' is not of the form section.key=value"),
])
def test_mistakes_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(SFTRecipe, TINY, [override])


def test_missing_recipe_and_required_key(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_recipe(SFTRecipe, tmp_path / "nope.yaml")
    (tmp_path / "r.yaml").write_text("data: {train: [x.jsonl]}\n")
    with pytest.raises(ConfigError, match="recipe r.yaml: checkpoint is required"):
        load_recipe(SFTRecipe, tmp_path / "r.yaml")
