"""`gptoss-nemo eval`: checkers, harmony prompts and answers, and the loss/pass-rate run on the tiny checkpoints
(CPU: transformers' GptOssForCausalLM)."""

import json

import pytest
import torch

from gptoss_nemo.cli import main
from gptoss_nemo.data import synthetic
from gptoss_nemo.data.conversation import parse_conversation
from gptoss_nemo.data.harmony import render
from gptoss_nemo.errors import ConfigError
from gptoss_nemo.evaluate.checkers import get_checker
from gptoss_nemo.evaluate.generate import final_answer, prompt_text
from gptoss_nemo.evaluate.hf_eval import evaluate

RECORD = synthetic.records(1, seed=3)[0]


def test_checkers():
    answer = RECORD["messages"][-1]["content"]
    assert get_checker("arithmetic")(RECORD, f"The answer is {answer}")
    assert not get_checker("arithmetic")(RECORD, f"{int(answer) + 1}")
    assert get_checker("contains:is")(RECORD, "it is") and not get_checker("contains:xyz")(RECORD, "it is")
    assert get_checker(r"regex:^\d+$")(RECORD, "42") and not get_checker(r"regex:^\d+$")(RECORD, "4 2")
    for bad, message in (("exact", "use arithmetic, contains:TEXT or regex:PATTERN"), ("regex:(", "not a regular")):
        with pytest.raises(ConfigError, match=message):
            get_checker(bad)


def test_prompt_is_the_rendered_conversation_up_to_the_answer():
    conv = parse_conversation(RECORD)
    full, _ = render(conv)
    prompt = prompt_text(conv)
    assert prompt.endswith("<|start|>assistant") and full.startswith(prompt)
    assert final_answer(full[len(prompt):]) == RECORD["messages"][-1]["content"]


def test_final_answer_parsing():
    gen = ("<|channel|>analysis<|message|>12 + 30 = 42.<|end|>"
           "<|start|>assistant<|channel|>final<|message|> 42 <|return|>")
    assert final_answer(gen) == "42"
    assert final_answer("<|channel|>final<|message|>4") == "4"  # cut by max_new_tokens
    assert final_answer("<|channel|>analysis<|message|>thinking...") == ""


def test_eval_mxfp4_equals_bf16_and_matches_transformers_loss(tiny_mxfp4, tiny_bf16):
    mx = evaluate(tiny_mxfp4, ["synthetic:arithmetic:2:5"], "arithmetic", samples=2, max_new_tokens=4, device="cpu")
    bf = evaluate(tiny_bf16, ["synthetic:arithmetic:2:5"], "arithmetic", samples=2, max_new_tokens=4, device="cpu")
    assert mx["samples"] == 2 and mx["loss_tokens"] > 0 and 0 <= mx["pass_rate"] <= 1
    assert mx["val_loss"] == bf["val_loss"]  # MXFP4 dequantized by transformers = the BF16 checkpoint, bit for bit

    # the same loss through transformers' own shifted cross-entropy
    from transformers import AutoTokenizer, GptOssForCausalLM

    from gptoss_nemo.data.harmony import encode

    model = GptOssForCausalLM.from_pretrained(tiny_bf16, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bf16)
    total, count = 0.0, 0
    for record in synthetic.records(2, seed=5):
        ids, mask = encode(parse_conversation(record), tok)
        labels = torch.tensor([[i if m else -100 for i, m in zip(ids, mask)]])
        with torch.no_grad():
            loss = model(torch.tensor([ids]), labels=labels).loss.item()
        n = sum(mask[1:])
        total, count = total + loss * n, count + n
    assert count == bf["loss_tokens"] and abs(total / count - bf["val_loss"]) < 1e-4


def test_eval_refuses_bad_input_before_loading(tiny_ckpt_meta, tiny_mxfp4, tiny_bf16, tmp_path, capsys):
    from ckpt_meta import write_ckpt_meta

    from gptoss_nemo.model.hf_config import GptOssConfig

    # a gptoss-nemo checkpoint is exported on a GPU first; here there is none: one line says so, and the exit code
    # (3) says that everything was checked but nothing ran
    assert main(["eval", str(tiny_ckpt_meta), "--data", "synthetic:arithmetic:2"]) == 3
    assert "needs CUDA GPUs" in capsys.readouterr().err
    w4a4 = write_ckpt_meta(tmp_path / "w4a4", GptOssConfig.from_file(tiny_mxfp4), tiny_mxfp4, quant="nvfp4_w4a4")
    assert main(["eval", str(w4a4), "--data", "synthetic:arithmetic:2"]) == 2
    assert "activations in BF16" in capsys.readouterr().err
    assert main(["eval", str(tiny_bf16), "--data", "synthetic:arithmetic:x"]) == 2
    assert "synthetic:TASK:N:SEED" in capsys.readouterr().err
    assert main(["eval", str(tiny_bf16), "--data", "synthetic:arithmetic:2", "--checker", "bogus"]) == 2
    assert "--checker 'bogus'" in capsys.readouterr().err


def test_eval_command_prints_table_and_json(tiny_bf16, capsys):
    assert main(["eval", str(tiny_bf16), "--data", "synthetic:arithmetic:1:9", "--samples", "1",
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["checkpoint", "samples", "val", "loss", "pass", "rate"]
    rows = json.loads(out[-1])["eval"]
    assert rows[0]["samples"] == 1 and rows[0]["checker"] == "arithmetic"


def test_verify_export_noise_floor_pairs_each_bf16_run_with_transformers_fp32(tiny_bf16):
    """verify-export's floor: transformers' BF16 and the megatron model's logits, each against transformers' FP32.
    Given transformers' own FP32 logits as 'megatron's', that pair is exact and the BF16 pair equals the main one."""
    from transformers import GptOssForCausalLM

    from gptoss_nemo.evaluate.verify_export import _against_transformers

    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    model = GptOssForCausalLM.from_pretrained(tiny_bf16, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        fp32 = model(input_ids=ids).logits
    r = _against_transformers(tiny_bf16, ids, fp32, floor=True)
    assert r["megatron_vs_transformers_fp32"] == {"min_cos": pytest.approx(1.0, abs=1e-12), "top1": 1.0}
    floor = r["transformers_bf16_vs_fp32"]
    assert floor["min_cos"] == pytest.approx(r["min_cos"], abs=1e-9) and floor["top1"] == r["top1"]
    assert floor["min_cos"] < 1 - 1e-7  # BF16 rounding is there to see
    no_floor = _against_transformers(tiny_bf16, ids, fp32, floor=False)
    assert "megatron_vs_transformers_fp32" not in no_floor and no_floor["top1"] == r["top1"]
