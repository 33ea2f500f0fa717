"""The implementation setting (issue 21; model/impl.py): resolved once from the recipe's model.impl, the command
line and what is installed; explicit choices never replaced; TE too old refused; the moved train.kernels named;
checkpoints record the implementation that wrote them, and one naming an unknown implementation is refused."""

import json

import pytest

from gptoss_nemo.errors import CheckpointError, ConfigError
from gptoss_nemo.model import impl as impl_mod
from gptoss_nemo.model.impl import resolve_impl, with_local_spec
from gptoss_nemo.parallel.layout import ParallelLayout


@pytest.fixture
def installed(monkeypatch):
    """Set what this machine has: installed(te=..., fused=...) with a problem string or None."""
    def set_(te=None, fused=None):
        monkeypatch.setattr(impl_mod, "te_problem", lambda: te)
        monkeypatch.setattr(impl_mod, "fused_problem", lambda: fused)
    return set_


@pytest.mark.parametrize("te,fused,layout,training,expected", [
    (None, None, ParallelLayout(), True, "fused"),  # the NeMo container: fused is still the default
    ("no TE", None, ParallelLayout(), True, "fused"),
    (None, None, ParallelLayout(tp=2), True, "te"),  # training with TP needs TE's spec
    (None, None, ParallelLayout(tp=2), False, "fused"),  # import / export with TP run on the local spec
    (None, "no grouped_mm", ParallelLayout(), True, "te"),  # an older torch: TE where it imports
    ("no TE", "no grouped_mm", ParallelLayout(), True, "reference"),
])
def test_auto_resolution(installed, te, fused, layout, training, expected):
    installed(te, fused)
    got = resolve_impl("auto", layout=layout, training=training)
    assert got.name == expected and got.why.startswith("auto")


def test_explicit_choices_are_kept_or_refused_with_the_alternative(installed):
    installed(None, None)
    assert [resolve_impl(n).name for n in ("fused", "te", "reference")] == ["fused", "te", "reference"]
    installed("transformer_engine does not import", None)
    with pytest.raises(ConfigError, match="model.impl=te: transformer_engine does not import; use model.impl=fused"):
        resolve_impl("te")
    installed(None, "torch 2.5 has no torch.nn.functional.grouped_mm")
    with pytest.raises(ConfigError, match="grouped_mm; use model.impl=te"):
        resolve_impl("fused")
    installed("no TE", "no flex attention")
    with pytest.raises(ConfigError, match="use model.impl=reference"):
        resolve_impl("fused")
    with pytest.raises(ConfigError, match="model.impl='flash'"):
        resolve_impl("flash")
    installed("no TE", "no flex attention")  # planning for a job's container ignores this machine
    assert resolve_impl("te", here=False).name == "te"
    assert resolve_impl("auto", layout=ParallelLayout(tp=2), training=True, here=False).name == "te"


def test_te_older_than_sinks_support_is_refused(monkeypatch):
    monkeypatch.setattr(impl_mod, "te_version", lambda: "2.7.0")
    assert "2.7.0 < 2.8 has no fused attention with learnable sinks" in impl_mod.te_problem()
    monkeypatch.setattr(impl_mod, "te_version", lambda: "2.20.2")
    assert impl_mod.te_problem() is None


def test_local_spec_flag_means_not_transformer_engine():
    assert [with_local_spec(n, True) for n in ("auto", "te", "fused", "reference")] == [
        "fused", "fused", "fused", "reference"]
    assert with_local_spec("te", False) == "te"


def test_this_torch_runs_the_fused_kernels():
    assert impl_mod.fused_problem() is None  # CI's torch (and the GPU image's) has flex attention and grouped_mm


def test_train_kernels_is_named_as_moved(tmp_path):
    from pathlib import Path

    from gptoss_nemo.config.load import load_recipe
    from gptoss_nemo.config.sft import SFTRecipe

    recipe = Path(__file__).parents[1] / "recipes" / "sft_tiny.yaml"
    with pytest.raises(ConfigError, match="train.kernels was replaced by model.impl"):
        load_recipe(SFTRecipe, recipe, ["train.kernels=fused"])
    with pytest.raises(ConfigError, match="model.impl='fast'"):
        load_recipe(SFTRecipe, recipe, ["model.impl=fast"])
    assert load_recipe(SFTRecipe, recipe, ["model.impl=te"]).model.impl == "te"


def test_dry_run_says_which_implementation_and_why(tiny_ckpt_meta, tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from gptoss_nemo.cli import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    recipe = str(Path(__file__).parents[1] / "recipes" / "sft_tiny.yaml")
    base = ["sft", recipe, f"checkpoint={tiny_ckpt_meta}", f"train.out_dir={tmp_path / 'run'}",
            "data.train=[synthetic:arithmetic:64]", "train.tensorboard=false", "train.plots=false"]
    assert main([*base, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dry_run"]
    assert plan["impl"]["name"] == "fused" and plan["impl"]["why"].startswith("auto")
    assert main([*base, "model.impl=reference", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dry_run"]["impl"]["name"] == "reference"
    assert main([*base, "model.impl=te", "--dry-run", "--local-spec"]) == 0  # the flag over the recipe
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dry_run"]["impl"]["name"] == "fused"
    if impl_mod.te_problem() is not None:  # CI: no Transformer Engine
        assert main([*base, "--dry-run", "--impl", "te"]) == 2
        assert "model.impl=te: transformer_engine does not import" in capsys.readouterr().err


def test_checkpoints_record_their_implementation(tmp_path, monkeypatch):
    import torch.distributed as dist

    from gptoss_nemo.convert.dist_checkpoint import META_FILE, read_dist_checkpoint_config, write_checkpoint_meta
    from gptoss_nemo.model.presets import tiny

    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    write_checkpoint_meta(tmp_path, tiny(), layout=ParallelLayout(), impl="te", source="x", side_files_from=None)
    _, meta = read_dist_checkpoint_config(tmp_path)
    assert meta["impl"] == "te"
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "impl": "xla"}))
    with pytest.raises(CheckpointError, match="written by implementation 'xla', which this gptoss-nemo does not know"):
        read_dist_checkpoint_config(tmp_path)


def test_unknown_implementation_refused_before_any_gpu(tiny_ckpt_meta, tmp_path, capsys):
    import shutil

    from gptoss_nemo.cli import main
    from gptoss_nemo.convert.dist_checkpoint import META_FILE

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_meta, ckpt)
    meta = json.loads((ckpt / META_FILE).read_text())
    (ckpt / META_FILE).write_text(json.dumps({**meta, "impl": "xla"}))
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "written by implementation 'xla'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_packing_under_te_refused_where_cudnn_lacks_the_thd_backward(installed, tiny_ckpt_meta, tmp_path, capsys,
                                                                     monkeypatch):
    """TE 2.20 with cuDNN 9.19 (the lent H200): "Known cuDNN < 9.26.0 issue with THD learnable softmax backward"."""
    from pathlib import Path

    import torch

    from gptoss_nemo.cli import main

    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    assert impl_mod.te_packing_problem().startswith("cuDNN 9.19 < 9.26 has no backward")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 92600)
    assert impl_mod.te_packing_problem() is None
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    installed(None, None)  # as if TE imported
    monkeypatch.setenv("WORLD_SIZE", "1")
    recipe = str(Path(__file__).parents[1] / "recipes" / "sft_tiny.yaml")
    base = ["sft", recipe, f"checkpoint={tiny_ckpt_meta}", f"train.out_dir={tmp_path / 'run'}",
            "data.train=[synthetic:arithmetic:64]", "train.tensorboard=false", "train.plots=false"]
    assert main([*base, "--dry-run", "--impl", "te"]) == 2
    err = capsys.readouterr().err
    assert "data.packing=true with model.impl=te: cuDNN 9.19 < 9.26" in err and "data.packing=false" in err
    assert main([*base, "data.packing=false", "--dry-run", "--impl", "te"]) == 0
    assert main([*base, "--dry-run", "--impl", "fused"]) == 0  # flex attention keeps packed documents apart
