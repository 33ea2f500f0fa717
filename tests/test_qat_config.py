"""QAT recipe validation and the ModelOpt configurations: each format quantizes exactly the expert linear layers
of megatron's gpt-oss (names from the conversion table, local and TE specs), never the router, attention,
embedding or output layer."""

import fnmatch
import re
from pathlib import Path

import pytest

from gptoss_nemo.config.load import load_recipe
from gptoss_nemo.config.qat import QATRecipe
from gptoss_nemo.convert.mapping import megatron_param_names
from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.presets import tiny
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.quantize.formats import FORMATS, modelopt_config

RECIPE = Path(__file__).parents[1] / "recipes" / "sft_tiny.yaml"
QAT_RECIPE = RECIPE.with_name("qat_tiny.yaml")


def enabled_quantizers(config: dict, quantizer_names: list[str]) -> dict[str, dict]:
    """Which of `quantizer_names` the config enables, with the attributes it sets: the entries of
    `config["quant_cfg"]` applied in order, later ones overriding earlier ones (ModelOpt's rule), name patterns
    matched with fnmatch. Entries restricted to a module class (`parent_class`) are skipped: none of them names a
    class in megatron's gpt-oss."""
    state: dict[str, dict | None] = {n: None for n in quantizer_names}
    for entry in config["quant_cfg"]:
        if "parent_class" in entry:
            continue
        pattern = entry["quantizer_name"]
        for name in quantizer_names:
            if fnmatch.fnmatch(name, pattern):
                if entry.get("enable", True) is False:
                    state[name] = None
                elif "cfg" in entry:
                    state[name] = dict(entry["cfg"])
                elif entry.get("enable") is True:
                    state[name] = state[name] or {}
    return {n: cfg for n, cfg in state.items() if cfg is not None}


def _quantizers(te: bool) -> list[str]:
    """Quantizer names ModelOpt gives megatron's linear layers (and the router's weight): <module>.{weight,input,
    output}_quantizer; TE's grouped experts are one module per layer (weights weight0..weightN)."""
    index = ParallelLayout().owned(tiny(), ep_rank=0, pp_rank=0)
    params = megatron_param_names(index, te=te, pre_process=True, post_process=True)
    linear = re.compile(r"^(.*\.(?:linear_qkv|linear_proj|linear_fc1|linear_fc2|router)|output_layer)\.weight\d*$")
    modules = {m.group(1) for p in params if (m := linear.match(p))}
    return sorted(f"{m}.{q}_quantizer" for m in modules for q in ("weight", "input", "output"))


@pytest.mark.parametrize("te", [False, True])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_presets_quantize_exactly_the_experts(fmt, te):
    names = _quantizers(te)
    enabled = enabled_quantizers(modelopt_config(fmt), names)
    experts = [n for n in names if ".mlp.experts." in n and n.endswith("weight_quantizer")]
    assert len(experts) == 4 * (2 if te else 16) and any(".router." in n for n in names)
    assert experts and set(experts) <= set(enabled)
    for name, cfg in enabled.items():
        assert ".mlp.experts." in name, name  # nothing outside the experts
        assert tuple(cfg["num_bits"]) == (2, 1)  # E2M1 values
    inputs = {n for n in enabled if n.endswith("input_quantizer")}
    assert bool(inputs) == (fmt == "nvfp4_w4a4")  # activations only in w4a4
    cfg = enabled[experts[0]]
    if fmt == "mxfp4":
        assert cfg["block_sizes"][-1] == 32 and tuple(cfg["block_sizes"]["scale_bits"]) == (8, 0)  # E8M0 per 32
    else:  # NVFP4: E4M3 scale per 16 elements, one per-tensor scale per projection shared by the layer's experts
        assert cfg["block_sizes"][-1] == 16 and tuple(cfg["block_sizes"]["scale_bits"]) == (4, 3)
        assert modelopt_config(fmt)["algorithm"] == {"method": "max", "sync_expert_weight_amax": True}


def _recipe(*overrides):
    return load_recipe(QATRecipe, RECIPE, ["checkpoint=x", *overrides])


def test_qat_defaults():
    r = _recipe("optimizer.lr=1e-5", "optimizer.min_lr=1e-6", "optimizer.warmup_steps=10")
    assert r.quant.format == "mxfp4" and r.quant.modules == ["experts"] and not FORMATS["mxfp4"].calibrate
    assert QATRecipe(checkpoint="x", data=r.data).optimizer.lr == 1e-5


@pytest.mark.parametrize("overrides, message", [
    (["quant.format=int4"], "quant.format='int4'; use one of mxfp4, nvfp4, nvfp4_w4a4"),
    (["quant.modules=[experts,router]"], "quant.modules has 'router': the router stays BF16"),
    (["quant.modules=[attention]"], "attention stays BF16"),
    (["quant.modules=[]"], "quant.modules is empty"),
    (["optimizer.lr=3e-4"], "optimizer.lr=0.0003 is too high for QAT"),
    (["optimizer.warmup_steps=300"], "optimizer.warmup_steps=300 must be >= 0 and below train.steps=300"),
    (["optimizer.lr=1e-5", "optimizer.min_lr=1e-4"], "optimizer.min_lr=0.0001 must be in (0, optimizer.lr=1e-05]"),
])
def test_bad_qat_recipes(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _recipe("optimizer.lr=1e-5", "optimizer.min_lr=1e-6", *overrides)


def test_quantized_checkpoints_are_not_a_starting_point(tiny_mxfp4, tmp_path, capsys):
    """SFT / QAT / PTQ refuse a checkpoint that is already quantized, before any GPU work, with the fix."""
    from ckpt_meta import write_ckpt_meta

    from gptoss_nemo.cli import main
    from gptoss_nemo.model.hf_config import GptOssConfig

    qat = write_ckpt_meta(tmp_path / "qat", GptOssConfig.from_file(tiny_mxfp4), tiny_mxfp4, quant="mxfp4")
    for stage in ("sft", "qat", "ptq"):
        recipe = RECIPE if stage == "sft" else QAT_RECIPE
        assert main([stage, str(recipe), f"checkpoint={qat}", "--dry-run", "--local-spec"]) == 2
        err = capsys.readouterr().err
        assert "already quantized (mxfp4, by qat)" in err and "start from a BF16 checkpoint" in err, err


def test_export_formats_must_represent_the_training(tmp_path):
    from gptoss_nemo.convert.hf_export import check_format

    check_format(None, "mxfp4", tmp_path)  # BF16 checkpoint: MXFP4 is a PTQ-style export
    check_format("mxfp4", "mxfp4", tmp_path)
    check_format("nvfp4", "bf16", tmp_path)
    with pytest.raises(ConfigError, match="quantize them a second time"):
        check_format("nvfp4", "mxfp4", tmp_path)
    with pytest.raises(ConfigError, match="--format int4"):
        check_format(None, "int4", tmp_path)
    check_format("nvfp4", "nvfp4", tmp_path)
    check_format("nvfp4_w4a4", "nvfp4", tmp_path)
    for trained in (None, "mxfp4"):
        with pytest.raises(ConfigError, match="needs the NVFP4 scales"):
            check_format(trained, "nvfp4", tmp_path)


def test_qat_and_ptq_dry_run(tiny_ckpt_meta, capsys):
    import json

    from gptoss_nemo.cli import main

    for stage in ("qat", "ptq"):
        assert main([stage, str(QAT_RECIPE), f"checkpoint={tiny_ckpt_meta}", "--dry-run", "--local-spec"]) == 0
        plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dry_run"]
        assert plan["checkpoint"] == str(tiny_ckpt_meta) and plan["data"]["train_sequences"] > 0
    assert main(["qat", str(RECIPE), f"checkpoint={tiny_ckpt_meta}", "--dry-run", "--local-spec"]) == 2
    assert "too high for QAT" in capsys.readouterr().err  # the SFT recipe's 3e-4
    assert main(["ptq", str(QAT_RECIPE), f"checkpoint={tiny_ckpt_meta}", "quant.format=int4", "--dry-run"]) == 2
    assert "quant.format='int4'" in capsys.readouterr().err


def test_quant_error_statistics():
    import torch

    from gptoss_nemo.quantize.quant_error import element_stats, summarize

    w = torch.tensor([[1.0, -2.0, 0.0, 4.0]])
    q = torch.tensor([[1.0, -1.5, 0.5, 3.0]])
    sums, mx = element_stats(w, q)
    (row,) = summarize(sums[None], mx[None])
    # relative errors over w != 0: 0, 0.25, 0.25 -> mean 1/6, max 0.25; l2 = sqrt(0 + .25 + .25 + 1) / sqrt(21)
    assert row["mean_rel"] == pytest.approx(1 / 6) and row["max_rel"] == 0.25
    assert row["l2_rel"] == pytest.approx((1.5 ** 0.5) / 21 ** 0.5)
