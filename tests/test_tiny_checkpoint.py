"""make-tiny: the openai/gpt-oss layout, loading in transformers, and clear errors for broken checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptoss_nemo.checkpoint.hf_layout import INDEX_FILE, check_checkpoint, expected_tensors, weight_map
from gptoss_nemo.cli import main
from gptoss_nemo.errors import CheckpointError, ConfigError
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.presets import tiny


def test_layout_matches_openai(tiny_mxfp4):
    cfg = check_checkpoint(tiny_mxfp4)
    raw = json.loads((tiny_mxfp4 / "config.json").read_text())
    assert raw["architectures"] == ["GptOssForCausalLM"] and raw["model_type"] == "gpt_oss"
    assert raw["quantization_config"] == {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
    }
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    names = weight_map(tiny_mxfp4)
    p = "model.layers.0.mlp.experts."
    with safe_open(tiny_mxfp4 / names[p + "gate_up_proj_blocks"], "pt") as f:
        assert f.get_slice(p + "gate_up_proj_blocks").get_shape() == [e, 2 * i, h // 32, 16]
        assert f.get_slice(p + "gate_up_proj_blocks").get_dtype() == "U8"
    with safe_open(tiny_mxfp4 / names[p + "down_proj_scales"], "pt") as f:
        assert f.get_slice(p + "down_proj_scales").get_shape() == [e, h, i // 32]
    assert set(names) == set(expected_tensors(cfg))
    assert len(set(names.values())) >= 2  # sharded, with an index
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tiny_mxfp4 / f).is_file(), f


def test_loads_in_transformers_and_runs(tiny_mxfp4, tiny_bf16):
    from transformers import GptOssForCausalLM

    mx = GptOssForCausalLM.from_pretrained(tiny_mxfp4, dtype=torch.bfloat16)
    bf = GptOssForCausalLM.from_pretrained(tiny_bf16, dtype=torch.bfloat16)
    a, b = mx.state_dict(), bf.state_dict()
    assert a.keys() == b.keys()
    # transformers' MXFP4 dequantization of the packed checkpoint == the BF16 checkpoint, bit for bit.
    assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a if a[k].dtype == torch.bfloat16)
    ids = torch.randint(0, mx.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = mx(ids).logits
    assert logits.shape == (2, 200, 201088) and torch.isfinite(logits).all() and logits.float().std() > 0


def test_same_seed_same_weights_different_seed_differs(tmp_path, tiny_bf16):
    again = tmp_path / "again"
    assert main(["make-tiny", str(again), "--bf16", "--seed", "1234"]) == 0
    other = tmp_path / "other"
    assert main(["make-tiny", str(other), "--bf16", "--seed", "7"]) == 0
    name = "model.layers.1.mlp.router.weight"
    load = lambda d: load_file(d / weight_map(d)[name])[name]  # noqa: E731
    assert torch.equal(load(again), load(tiny_bf16)) and not torch.equal(load(other), load(tiny_bf16))


def test_refuses_existing_output(tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["make-tiny", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "user data"


COLLECTIVE = """
import sys, torch.distributed as dist
from gptoss_nemo.checkpoint.writer import collective_atomic_dir
rank, target = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", rank=rank, world_size=3, init_method="tcp://127.0.0.1:29651")
with collective_atomic_dir(target) as tmp:
    (tmp / f"rank{rank}").write_text(str(rank))
    assert not (tmp.parent / "out").exists()  # nothing at the target while any rank is writing
assert sorted(p.name for p in (tmp.parent / "out").iterdir()) == ["rank0", "rank1", "rank2"]
dist.barrier()
dist.destroy_process_group()  # exiting with a live gloo group can abort ("terminate called ...")
"""


def test_collective_atomic_dir_appears_once_every_rank_wrote(tmp_path):
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", COLLECTIVE, str(r), str(tmp_path / "out")],
                              stderr=subprocess.PIPE, text=True) for r in range(3)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-1000:] for e in errs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory left behind


def test_rejects_bad_dimensions(capsys):
    assert main(["make-tiny", "/tmp/never", "--hidden", "100"]) == 2
    assert "--hidden=100 is not a multiple of 32" in capsys.readouterr().err


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_mismatched_block_scale_shapes_name_the_tensor(tmp_path, tiny_mxfp4):
    d = _copy(tiny_mxfp4, tmp_path / "bad")
    name = "model.layers.2.mlp.experts.down_proj_scales"
    fname = weight_map(d)[name]
    tensors = load_file(d / fname)
    tensors[name] = tensors[name][..., :-1].contiguous()
    save_file(tensors, d / fname, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name} has shape"):
        check_checkpoint(d)


def test_not_gpt_oss(tmp_path, tiny_mxfp4):
    d = _copy(tiny_mxfp4, tmp_path / "llama")
    raw = json.loads((d / "config.json").read_text())
    raw.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        check_checkpoint(d)


def test_missing_shard_and_missing_tensor(tmp_path, tiny_mxfp4):
    d = _copy(tiny_mxfp4, tmp_path / "noshard")
    (d / sorted(set(weight_map(d).values()))[-1]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        check_checkpoint(d)
    d2 = _copy(tiny_mxfp4, tmp_path / "notensor")
    index = json.loads((d2 / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.3.self_attn.sinks"]
    (d2 / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.3.self_attn.sinks is missing"):
        check_checkpoint(d2)


def test_bf16_mxfp4_mix_is_refused(tmp_path, tiny_mxfp4, tiny_bf16):
    d = _copy(tiny_mxfp4, tmp_path / "mix")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    extra = {name: load_file(tiny_bf16 / weight_map(tiny_bf16)[name])[name]}
    save_file(extra, d / "extra.safetensors", metadata={"format": "pt"})
    index = json.loads((d / INDEX_FILE).read_text())
    index["weight_map"][name] = "extra.safetensors"
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="mixes MXFP4 experts .* and BF16 experts"):
        check_checkpoint(d)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        GptOssConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GptOssConfig.from_file(tmp_path)


def test_tiny_preset_is_valid_for_parallel_layouts():
    cfg = tiny()
    assert cfg.num_hidden_layers >= 4 and set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.num_local_experts % 2 == 0 and cfg.num_key_value_heads % 2 == 0  # EP2 / TP2 divide
