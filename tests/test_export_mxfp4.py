"""The MXFP4 export stream (convert/to_mxfp4.py): BF16 Hugging Face tensors in, the openai/gpt-oss MXFP4 layout
out, as the export writes it; transformers loads the result and dequantizes it to exactly the fake-quantized
weights (checkpoint/mxfp4.py, ties to even)."""

import pytest
import torch

from gptoss_nemo.checkpoint import mxfp4
from gptoss_nemo.checkpoint.hf_layout import check_checkpoint, copy_side_files, read_tensors
from gptoss_nemo.checkpoint.writer import write_shards
from gptoss_nemo.convert.to_mxfp4 import to_mxfp4
from gptoss_nemo.model.hf_config import GptOssConfig


def _export(tensors: dict, src, out):
    out.mkdir()
    write_shards(to_mxfp4(tensors.items()), out, max_shard_bytes=20 << 20)
    GptOssConfig.from_file(src).replace(quantized=True).save(out)
    copy_side_files(src, out)
    check_checkpoint(out)  # names, shapes and dtypes of the openai/gpt-oss MXFP4 layout
    return out


def _transformers_state(path):
    from transformers import GptOssForCausalLM, Mxfp4Config

    cfg = GptOssConfig.from_file(path)
    kwargs = {"quantization_config": Mxfp4Config(dequantize=True)} if cfg.quantized else {}
    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def bf16_state(tiny_bf16):
    return _transformers_state(tiny_bf16)


def test_grid_values_round_trip_exactly(tiny_bf16, tiny_mxfp4, bf16_state, tmp_path):
    """The BF16 tiny holds dequantized MXFP4 values: exporting it gives transformers the same model, bit for bit."""
    out = _export(read_tensors(tiny_bf16), tiny_bf16, tmp_path / "mx")
    loaded = _transformers_state(out)
    assert loaded.keys() == bf16_state.keys()
    assert all(torch.equal(loaded[k], bf16_state[k]) for k in loaded)
    ours, source = read_tensors(out), read_tensors(tiny_mxfp4)
    assert {k for k in ours if k.endswith(("_blocks", "_scales"))} == {k for k in source
                                                                       if k.endswith(("_blocks", "_scales"))}


def test_trained_values_are_written_as_their_fake_quantization(tiny_bf16, bf16_state, tmp_path):
    """Off-grid weights (as after QAT's optimizer step): transformers' dequantization of the export equals the
    fake-quantized weights, element for element, in HF's [E, in, out] layout."""
    tensors = read_tensors(tiny_bf16)
    g = torch.Generator().manual_seed(0)
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name] = (tensors[name].float() * (1 + 0.3 * torch.rand(tensors[name].shape, generator=g))).bfloat16()
    out = _export(tensors, tiny_bf16, tmp_path / "mx")
    loaded = _transformers_state(out)
    checked = 0
    for name, w in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            want = mxfp4.fake_quantize(w.transpose(-1, -2)).transpose(-1, -2)
            assert torch.equal(loaded[name], want), name
            assert not torch.equal(want, w)  # the values did move onto the grid
            checked += 1
        elif name in loaded:
            assert torch.equal(loaded[name], w), name  # everything else stays BF16, untouched
    assert checked == 8  # 4 layers x (gate_up, down)


def test_verify_export_refuses_mismatches_before_any_gpu(tiny_mxfp4, tiny_ckpt_meta, tmp_path, capsys):
    """verify-export: an export of another model, a directory that is no export, and (on a CPU machine) the GPU
    itself are reported in one line each, before any model is built."""
    from gptoss_nemo.checkpoint.tiny import write_tiny_checkpoint
    from gptoss_nemo.cli import main
    from gptoss_nemo.model.presets import tiny

    other = write_tiny_checkpoint(tmp_path / "other", tiny(layers=2), seed=0, tokenizer=False)
    assert main(["verify-export", str(other), "--against", str(tiny_ckpt_meta)]) == 2
    assert "num_hidden_layers is 2 there and 4 in the checkpoint" in capsys.readouterr().err
    assert main(["verify-export", str(tmp_path), "--against", str(tiny_ckpt_meta)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["verify-export", str(tiny_mxfp4), "--against", str(tiny_mxfp4)]) == 2
    assert "not a gptoss-nemo checkpoint" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():  # everything checked, nothing run: exit 3
        assert main(["verify-export", str(tiny_mxfp4), "--against", str(tiny_ckpt_meta), "--samples", "2",
                     "--data", "synthetic:arithmetic:40"]) == 3
        assert "needs CUDA GPUs" in capsys.readouterr().err


def test_progress_line_counts_bf16_bytes():
    import io

    import torch

    from gptoss_nemo.convert.progress import format_progress, with_progress

    assert format_progress(12_400_000_000, 233_800_000_000, 30.0) == \
        "export: 12.4 / 233.8 GB (5.3%), 0.41 GB/s, ETA 8m55s"  # 221.4 GB at 0.4133 GB/s
    out = io.StringIO()
    items = [("a", torch.zeros(500, dtype=torch.bfloat16)), ("b", torch.zeros(250, dtype=torch.uint8))]
    assert [n for n, _ in with_progress(items, 1500, stream=out)] == ["a", "b"]
    assert out.getvalue().strip().splitlines()[-1].startswith("export: 0.0 / 0.0 GB (100.0%)")


def test_nvfp4_codec_rules():
    """Hand-checked NVFP4 cases: global scale amax / 2688, E4M3 block scale of block_amax / (6 gs), ties to the
    even code, even element in the low nibble, the kernel's S < 1e-5 guard, saturation at 6."""
    import torch

    from gptoss_nemo.checkpoint import nvfp4

    amax = 2688.0  # gs = 1
    w = torch.zeros(2, 32)
    w[0, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -6.0, -0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0])
    w[0, 16:] = 3.0  # block amax 3 -> s8 = E4M3(0.5) = 0.5, codes 6.0
    w[1, :16] = 1e-6  # S = E4M3(1e-6 / 6) ~ 0 < 1e-5: the guard; everything quantizes to 0
    packed, scales, gs = nvfp4.quantize(w, amax)
    assert gs.item() == 1.0 and scales.float()[0].tolist() == [1.0, 0.5] and packed.shape == (2, 16)
    codes = torch.stack([packed & 15, packed >> 4], -1).reshape(2, 32)
    # 6, .25->0, .75->1.0, 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5->4.0, -6, -.5, 1, 1.5, 2, 3, 4, 0
    assert codes[0, :16].tolist() == [7, 0, 2, 2, 4, 4, 6, 6, 15, 9, 2, 3, 4, 5, 6, 0]
    assert (codes[0, 16:] == 7).all() and (codes[1] == 0).all()
    assert packed[0, 0] == 7 | (0 << 4) and packed[0, 1] == 2 | (2 << 4)  # element 2j low, 2j+1 high
    q = nvfp4.dequantize(packed, scales, gs, torch.float32)
    assert q[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0] and (q[0, 16:] == 3.0).all()
    assert (q[1] == 0).all()
    # a stale amax (weights grew after calibration): the block scale saturates at 448 and codes at 6
    big = nvfp4.fake_quantize(torch.full((1, 16), 10.0), amax=1.0)
    assert torch.allclose(big, torch.full((1, 16), 6 * 448 / 2688.0))


def test_nvfp4_codes_reproduce_the_kernels_fake_quant():
    """ModelOpt's Triton kernel divides with PTX div.full.f32 (not IEEE): at a rounding boundary it can pick the
    other code, and (rarely) the other E4M3 block scale. Given the kernel's output, the codec returns codes and
    scales that reproduce it exactly; an output no scale near the weight's own explains is refused."""
    import pytest
    import torch

    from gptoss_nemo.checkpoint import nvfp4

    amax = 2688.0  # gs = 1
    w = torch.zeros(2, 32)
    w[0, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -6.0, -0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0])
    w[0, 16:] = torch.linspace(-2.9, 3.0, 16)
    w[1, :16] = torch.linspace(-0.3, 0.2, 16)
    packed, scales, gs = nvfp4.quantize(w, amax)
    ieee = nvfp4.dequantize(packed, scales, gs, torch.float32)
    kernel = ieee.clone()
    kernel[0, 2] = 0.5  # 0.75 / 1 came out a hair below the tie: 0.5 (code 1), not 1.0
    bits = scales.view(torch.uint8).clone()
    bits[1, 0] += 1  # the block scale of row 1, block 0 one E4M3 step up (its division rounded the other way)
    s_up = bits.view(torch.float8_e4m3fn)
    kernel[1, :16] = nvfp4.dequantize(packed, s_up, gs, torch.float32)[1, :16]
    p2, s2, gs2 = nvfp4.quantize(w, amax, fake=kernel)
    assert torch.equal(nvfp4.dequantize(p2, s2, gs2, torch.float32), kernel)
    assert s2.view(torch.uint8)[1, 0] == bits[1, 0] and s2.view(torch.uint8)[0, 0] == scales.view(torch.uint8)[0, 0]
    assert (p2[0, 1] & 15) == 1  # element 2 (low nibble of byte 1): code 1 = 0.5
    with pytest.raises(ValueError, match="1 of 4 blocks"):
        bad = kernel.clone()
        bad[0, 5] = 2.2  # no E2M1 x scale near the weight's own is 2.2
        nvfp4.quantize(w, amax, fake=bad)


def test_nvfp4_formats_quantize_weights_alike():
    """The export builds its reference weight quantizer from `nvfp4`; `nvfp4_w4a4` must quantize weights the same."""
    from gptoss_nemo.quantize.formats import modelopt_config

    def weight_cfgs(fmt):  # effective_bits: AutoQuantize's cost metadata, not part of the arithmetic
        return {repr({k: v for k, v in e["cfg"].items() if k != "effective_bits"})
                for e in modelopt_config(fmt)["quant_cfg"]
                if "weight_quantizer" in e.get("quantizer_name", "") and e.get("cfg")}
    assert weight_cfgs("nvfp4") == weight_cfgs("nvfp4_w4a4") and len(weight_cfgs("nvfp4")) == 1


def test_nvfp4_export_layout_and_config():
    """ModelOpt's HF NVFP4 layout for gpt-oss: fused [E, in/2, out] codes, [E, in/16, out] E4M3 scales, one FP32
    scale per projection; dequantized, the experts equal the codec's values of each expert's [out, in] weight."""
    import torch

    from gptoss_nemo.checkpoint import nvfp4
    from gptoss_nemo.convert.to_nvfp4 import quantization_configs, to_nvfp4

    torch.manual_seed(0)
    e, h, i = 4, 64, 32
    gate_up = (torch.randn(e, h, 2 * i) * 0.02).to(torch.bfloat16)
    down = (torch.randn(e, i, h) * 0.02).to(torch.bfloat16)
    amax = {(0, "linear_fc1"): (0.1, None), (0, "linear_fc2"): (0.09, 3.5)}
    out = dict(to_nvfp4([("model.layers.0.mlp.experts.gate_up_proj", gate_up),
                         ("model.layers.0.mlp.experts.down_proj", down),
                         ("model.layers.0.mlp.router.weight", torch.ones(e, h))], amax))
    p = "model.layers.0.mlp.experts."
    assert out[p + "gate_up_proj"].shape == (e, h // 2, 2 * i) and out[p + "gate_up_proj"].dtype == torch.uint8
    assert out[p + "gate_up_proj_weight_scale"].shape == (e, h // 16, 2 * i)
    assert out[p + "gate_up_proj_weight_scale"].dtype == torch.float8_e4m3fn
    assert out[p + "gate_up_proj_weight_scale_2"].shape == () and p + "gate_up_proj_input_scale" not in out
    assert out[p + "down_proj_input_scale"].item() == torch.tensor(3.5 / 2688.0).item()
    assert torch.equal(out["model.layers.0.mlp.router.weight"], torch.ones(e, h))
    for k in range(e):
        deq = nvfp4.dequantize(out[p + "down_proj"][k].t(), out[p + "down_proj_weight_scale"][k].t(),
                               out[p + "down_proj_weight_scale_2"])
        assert torch.equal(deq, nvfp4.fake_quantize(down[k].t(), 0.09))
    config, hf_quant = quantization_configs(num_layers=2, activations=False)
    assert config["quant_method"] == "modelopt" and config["quant_algo"] == "W4A16_NVFP4"
    assert "input_activations" not in config["config_groups"]["group_0"]
    assert hf_quant["quantization"]["group_size"] == 16 and "model.layers.1.mlp.router" in config["ignore"]
    assert quantization_configs(2, activations=True)[0]["quant_algo"] == "NVFP4"
