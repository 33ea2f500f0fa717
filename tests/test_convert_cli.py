"""`gptoss-nemo import` / `export` refuse bad input before any GPU work: one message naming problem and fix."""

import json
import shutil


from gptoss_nemo.cli import main


def _copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    if config_changes:
        raw = json.loads((dst / "config.json").read_text())
        raw.update(config_changes)
        (dst / "config.json").write_text(json.dumps(raw))
    return dst


def _error(argv, capsys, monkeypatch, world=1) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


def test_import_layout_that_does_not_divide(tiny_mxfp4, tmp_path, capsys, monkeypatch):
    err = _error(["import", str(tiny_mxfp4), str(tmp_path / "out"), "--ep", "3"], capsys, monkeypatch, world=3)
    assert "num_local_experts=8 is not divisible by ep=3" in err
    err = _error(["import", str(tiny_mxfp4), str(tmp_path / "out"), "--ep", "2"], capsys, monkeypatch, world=1)
    assert "world size 1 / pp=1 is not divisible by ep=2" in err
    assert not (tmp_path / "out").exists()


def test_import_not_gpt_oss(tiny_mxfp4, tmp_path, capsys, monkeypatch):
    bad = _copy(tiny_mxfp4, tmp_path / "llama", model_type="llama", architectures=["LlamaForCausalLM"])
    assert "model_type" in _error(["import", str(bad), str(tmp_path / "out")], capsys, monkeypatch)


def test_import_missing_shard_and_missing_dir(tiny_mxfp4, tmp_path, capsys, monkeypatch):
    broken = _copy(tiny_mxfp4, tmp_path / "broken")
    next(broken.glob("model-00002-*.safetensors")).unlink()
    err = _error(["import", str(broken), str(tmp_path / "out")], capsys, monkeypatch)
    assert "model-00002-of-" in err and "missing" in err
    err = _error(["import", str(tmp_path / "nowhere"), str(tmp_path / "out")], capsys, monkeypatch)
    assert "no such checkpoint directory" in err


def test_import_refuses_existing_output(tiny_mxfp4, tmp_path, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    assert "already exists" in _error(["import", str(tiny_mxfp4), str(tmp_path / "out")], capsys, monkeypatch)


def test_export_from_a_hf_checkpoint_says_import_first(tiny_mxfp4, tmp_path, capsys, monkeypatch):
    err = _error(["export", str(tiny_mxfp4), str(tmp_path / "out")], capsys, monkeypatch)
    assert "not a gptoss-nemo checkpoint" in err and "gptoss-nemo import" in err
