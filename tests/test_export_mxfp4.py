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

    if not torch.cuda.is_available():
        assert main(["verify-export", str(tiny_mxfp4), "--against", str(tiny_ckpt_meta), "--samples", "2",
                     "--data", "synthetic:arithmetic:40"]) == 2
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
