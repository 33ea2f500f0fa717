"""Every bad input refused cleanly, before any GPU time: exit code 2, one line that names the problem (its key
words are checked), no traceback, and no new file anywhere under the test's directory (outputs included).

One table over every subcommand: data, recipes, overrides, checkpoints (broken copies of a make-tiny checkpoint:
truncated, missing and header-broken shards, no config.json, an index naming a tensor no shard has, wrong dtypes
and shapes), layouts, outputs, make-tiny, plan, eval, verify-export, launch and export. Each row runs the CLI's
`main(argv)` in this process. After the table: a full disk under a real write (exit 2, the partial output removed),
a killed writer (nothing complete-looking left), the exit code 3 of commands that checked everything but have no GPU
to run on, and unsafe files (a pickled object where a checkpoint holds tensors) refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from gptoss_nemo.cli import main

ROOT = Path(__file__).parents[1]
SFT_RECIPE = ROOT / "recipes" / "sft_tiny.yaml"
TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_JOB_ID")


@dataclass
class Ctx:
    """What a row builds its inputs from: a directory of its own and the session's tiny checkpoints."""

    tmp: Path
    hf: Path  # a make-tiny MXFP4 checkpoint (read-only: rows change copies)
    ckpt: Path  # the CPU-readable part of a gptoss-nemo checkpoint of it

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return path

    def jsonl(self, name: str, lines: list) -> str:
        text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
        return str(self.write(name, text))

    def hf_copy(self, name: str = "hf") -> Path:
        """The tiny checkpoint, its files hard-linked (change one with `replace`, never in place)."""
        dst = self.tmp / name
        shutil.copytree(self.hf, dst, copy_function=os.link)
        return dst

    @staticmethod
    def replace(path: Path, content: bytes) -> None:
        path.unlink()
        path.write_bytes(content)

    def shard(self, d: Path, k: int = 1) -> Path:
        return sorted(d.glob("model-*.safetensors"))[k - 1]

    def sft(self, *overrides: str, data: str = "[synthetic:arithmetic:64]") -> list[str]:
        return ["sft", str(SFT_RECIPE), f"checkpoint={self.ckpt}", f"train.out_dir={self.tmp / 'run'}",
                f"data.train={data}", *overrides, "--dry-run", "--local-spec"]

    def pipe(self, *overrides: str) -> list[str]:
        return ["pipeline", str(TINY_RECIPE), f"run_dir={self.tmp / 'run'}", *overrides, "--dry-run", "--local-spec"]

    def recipe(self, text: str | bytes, name: str = "r.yaml") -> str:
        return str(self.write(name, text))


@dataclass
class Row:
    name: str
    argv: Callable[[Ctx], list[str]]
    words: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    usage: bool = False  # argparse's own refusal: its usage line, then the one error line


def _sft_recipe_with(c: Ctx, cluster_line: str) -> str:
    """sft_tiny.yaml on the test's checkpoint, with one more line in its cluster section (the file's last)."""
    text = SFT_RECIPE.read_text().replace("checkpoint: runs/tiny-ckpt", f"checkpoint: {c.ckpt}")
    return c.recipe(text.rstrip("\n") + "\n" + cluster_line + "\n")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.unlink()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _truncated_shard(c: Ctx) -> list[str]:
    d = c.hf_copy()
    s = c.shard(d, 2)
    c.replace(s, s.read_bytes()[: s.stat().st_size // 2])  # an interrupted download
    return ["import", str(d), str(c.tmp / "out")]


def _broken_header(c: Ctx) -> list[str]:
    d = c.hf_copy()
    s = c.shard(d)
    c.replace(s, b"\xff" * 8 + s.read_bytes()[8:])
    return ["import", str(d), str(c.tmp / "out")]


def _index_names_absent_tensor(c: Ctx) -> list[str]:
    d = c.hf_copy()
    index = d / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"]["model.layers.0.mlp.router.weight_extra"] = c.shard(d).name
    c.replace(index, json.dumps(raw).encode())
    return ["import", str(d), str(c.tmp / "out")]


def _changed_tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        d = c.hf_copy()
        fname = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
        tensors = _tensors(d / fname)
        tensors[name] = change(tensors[name]).contiguous()
        _save(d / fname, tensors)
        return ["import", str(d), str(c.tmp / "out")]
    return build


def _extra_tensor(c: Ctx) -> list[str]:
    d = c.hf_copy()
    s = c.shard(d)
    tensors = _tensors(s)
    tensors["model.layers.0.mlp.extra"] = torch.zeros(2, dtype=torch.bfloat16)
    _save(s, tensors)
    index = d / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"]["model.layers.0.mlp.extra"] = s.name
    c.replace(index, json.dumps(raw).encode())
    return ["import", str(d), str(c.tmp / "out")]


def _config(change: Callable[[dict], object] | bytes) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        d = c.hf_copy()
        if isinstance(change, bytes):
            c.replace(d / "config.json", change)
        else:
            c.replace(d / "config.json", json.dumps(change(json.loads((d / "config.json").read_text()))).encode())
        return ["import", str(d), str(c.tmp / "out")]
    return build


def _without(name: str) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        d = c.hf_copy()
        (c.shard(d, 2) if name == "shard" else d / name).unlink()
        return ["import", str(d), str(c.tmp / "out")]
    return build


def _ckpt_meta(content: bytes) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        d = c.tmp / "ckpt"
        shutil.copytree(c.ckpt, d)
        (d / "gptoss_nemo.json").write_bytes(content)
        return ["export", str(d), str(c.tmp / "out")]
    return build


def _occupied(c: Ctx) -> list[str]:
    c.write("out/something", "x")
    return ["import", str(c.hf), str(c.tmp / "out")]


def _pipeline_hf(c: Ctx) -> list[str]:
    d = c.hf_copy()
    s = c.shard(d)
    c.replace(s, s.read_bytes()[:1000])
    return c.pipe("model.make_tiny=false", f"model.hf={d}")


def _eval_two(c: Ctx) -> list[str]:
    d = c.hf_copy()
    (d / "tokenizer.json").unlink()
    return ["eval", str(c.hf), str(d), "--data", "synthetic:arithmetic:2"]


NOT_UTF8 = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}\n'
GOOD = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}
LONG = {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "word " * 700}]}

ROWS = [
    # ---- data (sft --dry-run reads and tokenizes every line) ----
    Row("data-missing", lambda c: c.sft(data=f"[{c.tmp / 'nope.jsonl'}]"), ("nope.jsonl", "no such data file")),
    Row("data-directory", lambda c: c.sft(data=f"[{c.write('d/x.jsonl', '').parent}]"),
        ("is a directory, not a data file", "data.train")),
    Row("data-not-utf8", lambda c: c.sft(data=f"[{c.write('u.jsonl', NOT_UTF8)}]"),
        ("u.jsonl:1", "not UTF-8", "data.max_bad_fraction")),
    Row("data-not-json", lambda c: c.sft(data=f"[{c.jsonl('j.jsonl', [GOOD, '{oops'])}]"),
        ("j.jsonl:2", "not valid JSON")),
    Row("data-bad-role", lambda c: c.sft(data=f"[{c.jsonl('r.jsonl', [{'messages': [{'role': 'robot'}]}])}]"),
        ("r.jsonl:1", "role", "robot")),
    Row("data-empty-file", lambda c: c.sft(data=f"[{c.write('e.jsonl', '')}]"), ("no conversations found",)),
    Row("data-blank-lines", lambda c: c.sft(data=f"[{c.write('b.jsonl', chr(10) * 3)}]"),
        ("no conversations found",)),
    Row("data-bad-parquet", lambda c: c.sft(data=f"[{c.write('p.parquet', b'not parquet')}]"),
        ("p.parquet", "not a readable parquet file")),
    Row("data-max-bad-negative", lambda c: c.sft("data.max_bad_fraction=-1"), ("data.max_bad_fraction=-1",)),
    Row("data-max-bad-above-one", lambda c: c.sft("data.max_bad_fraction=2"), ("data.max_bad_fraction=2",)),
    Row("data-max-dropped-negative", lambda c: c.sft("data.max_dropped_fraction=-0.5"),
        ("data.max_dropped_fraction=-0.5",)),
    Row("data-overlong-unknown", lambda c: c.sft("data.overlong=cut"), ("data.overlong='cut'", "drop, truncate")),
    Row("data-overlong-error", lambda c: c.sft("data.overlong=error", data=f"[{c.jsonl('l.jsonl', [GOOD, LONG])}]"),
        ("l.jsonl:2", "data.overlong=error", "data.seq_length=512")),
    Row("data-overlong-too-many-dropped", lambda c: c.sft(data=f"[{c.jsonl('l.jsonl', [GOOD, LONG])}]"),
        ("l.jsonl:2", "data.max_dropped_fraction=0.05", "data.overlong=truncate")),
    Row("data-seq-length-short", lambda c: c.sft("data.seq_length=8"), ("data.seq_length=8",)),
    Row("data-seq-length-over-positions", lambda c: c.sft("data.seq_length=200000"),
        ("data.seq_length=200000", "max_position_embeddings")),
    Row("data-synthetic-spec", lambda c: c.sft(data="[synthetic:bogus:10]"), ("synthetic:TASK:N",)),
    Row("data-train-empty", lambda c: c.sft(data="[]"), ("data.train is empty",)),
    Row("data-validation-fraction", lambda c: c.sft("data.validation_fraction=1"),
        ("data.validation_fraction=1",)),
    Row("data-loss-on", lambda c: c.sft("data.loss_on=everything"), ("loss_on", "everything")),
    Row("data-reasoning-effort", lambda c: c.sft("data.reasoning_effort=extreme"), ("reasoning_effort",)),
    Row("data-seq-not-divisible-by-tp-te", lambda c: ["plan", str(TINY_RECIPE), "--world-size", "2",
                                                      "model.impl=te", "parallel.tp=2", "data.seq_length=1001",
                                                      "--no-data"],
        ("data.seq_length=1001 is not divisible by parallel.tp=2",)),
    Row("data-pipeline-not-utf8", lambda c: c.pipe(f"data.train=[{c.write('u.jsonl', NOT_UTF8)}]"),
        ("u.jsonl:1", "not UTF-8")),
    # ---- recipes ----
    Row("recipe-missing", lambda c: ["sft", str(c.tmp / "none.yaml"), "--dry-run"], ("none.yaml", "no such recipe")),
    Row("recipe-directory", lambda c: ["sft", str(c.tmp), "--dry-run"], ("is a directory, not a recipe file",)),
    Row("recipe-yaml-syntax", lambda c: ["sft", c.recipe("data:\n  train: [a, b\ntrain: {}\n"), "--dry-run"],
        ("r.yaml", "YAML syntax error at line", "fix the file")),
    Row("recipe-tab-indent", lambda c: ["sft", c.recipe("data:\n\ttrain: [a]\n"), "--dry-run"],
        ("YAML syntax error",)),
    Row("recipe-top-level-list", lambda c: ["sft", c.recipe("- a\n- b\n"), "--dry-run"],
        ("top level is a list", "mapping")),
    Row("recipe-top-level-scalar", lambda c: ["sft", c.recipe("42\n"), "--dry-run"], ("not a mapping",)),
    Row("recipe-not-utf8", lambda c: ["sft", c.recipe(b"checkpoint: caf\xe9\n"), "--dry-run"], ("not UTF-8",)),
    Row("recipe-unknown-key", lambda c: c.sft("train.stepz=3"), ("train.stepz is not a field of TrainConfig",)),
    Row("recipe-unknown-section", lambda c: c.sft("trainer.steps=3"), ("trainer is not a field of SFTRecipe",)),
    Row("recipe-wrong-type", lambda c: c.sft("train.steps=abc"), ("train.steps must be int", "'abc'")),
    Row("recipe-moved-key", lambda c: c.sft("train.kernels=fused"), ("train.kernels was replaced by model.impl",)),
    Row("recipe-missing-checkpoint", lambda c: ["sft", c.recipe("data: {train: [synthetic:arithmetic:4]}\n"),
                                                "--dry-run"], ("checkpoint is required",)),
    Row("recipe-checkpoint-absent", lambda c: c.sft(f"checkpoint={c.tmp / 'gone'}"),
        ("gone", "not a gptoss-nemo checkpoint")),
    Row("recipe-checkpoint-is-hf", lambda c: c.sft(f"checkpoint={c.hf}"), ("gptoss-nemo import",)),
    Row("recipe-negative-lr", lambda c: c.sft("optimizer.lr=-1"), ("optimizer.lr=-1", "must be > 0")),
    Row("recipe-min-lr-above-lr", lambda c: c.sft("optimizer.min_lr=1"), ("optimizer.min_lr=1",)),
    Row("recipe-warmup", lambda c: c.sft("optimizer.warmup_steps=400"), ("optimizer.warmup_steps=400",
                                                                          "train.steps=300")),
    Row("recipe-batch-zero", lambda c: c.sft("train.global_batch_size=0"), ("train.global_batch_size=0",)),
    Row("recipe-batch-split", lambda c: c.sft("train.global_batch_size=6"),
        ("train.global_batch_size=6 is not a multiple of train.micro_batch_size=4",)),
    Row("recipe-impl", lambda c: c.sft("model.impl=tpu"), ("model.impl='tpu'",)),
    Row("recipe-router-none", lambda c: c.sft("router.load_balancing_type=none"),
        ("router.load_balancing_type='none'",)),
    Row("recipe-wandb-missing", lambda c: c.sft("train.wandb_project=p"), ("train.wandb_project", "wandb")),
    Row("cluster-time-99", lambda c: c.sft("cluster.time='99:99:99'"), ("cluster.time='99:99:99'", "below 60")),
    Row("cluster-time-day-hours", lambda c: c.sft("cluster.time='1-25:00:00'"), ("cluster.time='1-25:00:00'",)),
    Row("cluster-env-not-list", lambda c: c.sft("cluster.env=NCCL_DEBUG=INFO"),
        ("cluster.env must be a list", "[NCCL_DEBUG=INFO]")),
    Row("cluster-env-bad-name", lambda c: c.sft("cluster.env=[1BAD=x]"), ("NAME=value", "1BAD=x")),
    Row("cluster-image-newline", lambda c: ["sft", _sft_recipe_with(c, '  container_image: "nvcr.io#nvidia/nemo:25.11'
                                                                       '\\nrm -rf /"'), "--dry-run", "--local-spec"],
        ("cluster.container_image", "control character")),
    Row("cluster-partition", lambda c: c.sft("cluster.partition='a b'"), ("cluster.partition", "letters")),
    Row("cluster-gpus-zero", lambda c: c.sft("cluster.gpus_per_node=0"), ("cluster.gpus_per_node=0",)),
    Row("cluster-port", lambda c: c.sft("cluster.master_port=80"), ("cluster.master_port=80",)),
    Row("cluster-mount", lambda c: c.sft("cluster.container_mounts=[/data]"), ("container_mounts", "/data")),
    Row("cluster-stop-before-limit", lambda c: c.sft("cluster.stop_before_limit_s=5000"),
        ("cluster.stop_before_limit_s=5000",)),
    # ---- the pipeline recipe: errors name the stage's key ----
    Row("pipeline-qat-batch", lambda c: c.pipe("qat.train.global_batch_size=0"),
        ("qat.train.global_batch_size=0",)),
    Row("pipeline-sft-warmup", lambda c: c.pipe("sft.optimizer.warmup_steps=5000"),
        ("sft.optimizer.warmup_steps=5000", "sft.train.steps")),
    Row("pipeline-sft-min-lr", lambda c: c.pipe("sft.optimizer.min_lr=1"), ("sft.optimizer.min_lr=1",
                                                                           "sft.optimizer.lr")),
    Row("pipeline-qat-format", lambda c: c.pipe("qat.quant.format=int8"), ("qat.quant.format='int8'",)),
    Row("pipeline-qat-lr", lambda c: c.pipe("qat.optimizer.lr=0.1", "qat.optimizer.min_lr=0.01"),
        ("qat.optimizer.lr=0.1", "too high for QAT")),
    Row("pipeline-qat-batch-split", lambda c: c.pipe("qat.train.global_batch_size=6",
                                                     "qat.train.micro_batch_size=4"),
        ("qat.train.global_batch_size=6 is not a multiple of qat.train.micro_batch_size=4",)),
    Row("pipeline-export-format", lambda c: c.pipe("export=[nvfp4]"), ("nvfp4", "qat.quant.format")),
    Row("pipeline-no-model", lambda c: c.pipe("model.make_tiny=false"), ("model.hf", "model.make_tiny")),
    Row("pipeline-out-dir", lambda c: c.pipe("sft.train.out_dir=x"), ("sft.train.out_dir", "run_dir")),
    Row("pipeline-checker", lambda c: c.pipe("eval.checker=bogus"), ("bogus",)),
    Row("pipeline-run-dir-under-file", lambda c: c.pipe(f"run_dir={c.write('f', 'x') / 'run'}"),
        ("is a file", "choose another output path")),
    Row("pipeline-run-dir-newline", lambda c: ["pipeline", c.recipe(TINY_RECIPE.read_text().replace(
        "run_dir: runs/tiny", f'run_dir: "{c.tmp}/a\\nb"')), "--dry-run", "--local-spec"],
        ("run_dir", "control character")),
    Row("pipeline-world-size-zero", lambda c: c.pipe(), ("WORLD_SIZE='0'", "integer >= 1"), env={"WORLD_SIZE": "0"}),
    Row("pipeline-world-size-text", lambda c: c.pipe(), ("WORLD_SIZE='eight'",), env={"WORLD_SIZE": "eight"}),
    Row("launcher-rank-text", lambda c: ["import", str(c.hf), str(c.tmp / "out")], ("RANK='x'",),
        env={"RANK": "x"}),
    Row("launcher-rank-beyond-world", lambda c: ["import", str(c.hf), str(c.tmp / "out")],
        ("rank 3 in a world of 2",), env={"RANK": "3", "WORLD_SIZE": "2"}),
    Row("pipeline-layout-ep3", lambda c: c.pipe("parallel.ep=3"), ("not divisible by ep=3",), env={"WORLD_SIZE": "3"}),
    Row("pipeline-broken-hf", _pipeline_hf, ("model-00001-of-", "not a readable safetensors file")),
    # ---- overrides ----
    Row("override-unclosed-list", lambda c: c.sft("data.train=[a,b"), ("data.train=[a,b", "not valid YAML")),
    Row("override-backtick", lambda c: c.sft("train.out_dir=`x`"), ("not valid YAML", "quote it")),
    Row("override-unclosed-quote", lambda c: c.sft('train.out_dir="x'), ("not valid YAML",)),
    Row("override-no-key", lambda c: c.sft("=5"), ("'=5' is not of the form section.key=value",)),
    Row("override-no-equals", lambda c: c.sft("train.steps"), ("'train.steps' is not of the form",)),
    Row("override-after-flags", lambda c: [*c.sft(), "train.steps=abc"], ("train.steps must be int",)),
    Row("override-unknown-flag", lambda c: [*c.sft(), "--bogus"], ("unrecognized arguments: --bogus",), usage=True),
    Row("override-on-import", lambda c: ["import", str(c.hf), str(c.tmp / "out"), "a.b=1"],
        ("import takes no a.b=c overrides",), usage=True),
    # ---- checkpoints (import reads the headers of a broken copy of the tiny checkpoint) ----
    Row("ckpt-truncated-shard", _truncated_shard, ("model-00002-of-", "not a readable safetensors file",
                                                   "download")),
    Row("ckpt-broken-header", _broken_header, ("model-00001-of-", "not a readable safetensors file")),
    Row("ckpt-missing-shard", _without("shard"), ("model-00002-of-", "missing")),
    Row("ckpt-no-config", _without("config.json"), ("no config.json",)),
    Row("ckpt-no-index", _without("model.safetensors.index.json"), ("model.safetensors.index.json",
                                                                     "exactly one .safetensors")),
    Row("ckpt-config-not-json", _config(b"{not json"), ("config.json", "not valid JSON")),
    Row("ckpt-config-list", _config(lambda raw: [raw]), ("config.json", "not a config object")),
    Row("ckpt-not-gpt-oss", _config(lambda raw: {**raw, "model_type": "llama"}), ("model_type",)),
    Row("ckpt-config-bad-heads", _config(lambda raw: {**raw, "num_key_value_heads": 3}),
        ("num_attention_heads=8 is not a multiple of num_key_value_heads=3",)),
    Row("ckpt-config-odd-head-dim", _config(lambda raw: {**raw, "head_dim": 31}), ("head_dim=31 is odd",)),
    Row("ckpt-index-not-json", lambda c: (lambda d: (c.replace(d / "model.safetensors.index.json", b"{"),
                                                     ["import", str(d), str(c.tmp / "out")])[1])(c.hf_copy()),
        ("model.safetensors.index.json", "not a safetensors index")),
    Row("ckpt-index-names-absent-tensor", _index_names_absent_tensor,
        ("router.weight_extra", "is in model.safetensors.index.json but not in the file")),
    Row("ckpt-wrong-dtype", _changed_tensor("model.layers.0.self_attn.q_proj.weight", lambda t: t.float()),
        ("model.layers.0.self_attn.q_proj.weight is torch.float32, expected torch.bfloat16",)),
    Row("ckpt-wrong-shape", _changed_tensor("model.layers.1.mlp.router.weight", lambda t: t[:-1]),
        ("model.layers.1.mlp.router.weight has shape",)),
    Row("ckpt-extra-tensor", _extra_tensor, ("unexpected tensor model.layers.0.mlp.extra",)),
    Row("ckpt-not-a-directory", lambda c: ["import", str(c.tmp / "nowhere"), str(c.tmp / "out")],
        ("nowhere", "no such checkpoint directory")),
    Row("ckpt-meta-not-json", _ckpt_meta(b"{"), ("gptoss_nemo.json", "not valid JSON")),
    Row("ckpt-meta-format", _ckpt_meta(b'{"format": 99}'), ("gptoss_nemo.json", "format 99")),
    Row("export-from-hf", lambda c: ["export", str(c.hf), str(c.tmp / "out")], ("gptoss-nemo import",)),
    Row("export-format", lambda c: ["export", str(c.ckpt), str(c.tmp / "out"), "--format", "nvfp4"],
        ("nvfp4",)),
    # ---- layouts ----
    Row("layout-ep3", lambda c: ["import", str(c.hf), str(c.tmp / "out"), "--ep", "3"],
        ("num_local_experts=8 is not divisible by ep=3",), env={"WORLD_SIZE": "3"}),
    Row("layout-world", lambda c: ["import", str(c.hf), str(c.tmp / "out"), "--ep", "2"],
        ("world size 1 / pp=1 is not divisible by ep=2",)),
    Row("layout-pp3", lambda c: ["import", str(c.hf), str(c.tmp / "out"), "--pp", "3"], ("pp=3",),
        env={"WORLD_SIZE": "3"}),
    Row("layout-tp-zero", lambda c: ["import", str(c.hf), str(c.tmp / "out"), "--tp", "0"], ("tp",)),
    Row("layout-sft-ep16", lambda c: c.sft("parallel.ep=16"), ("ep=16",), env={"WORLD_SIZE": "16"}),
    # ---- outputs ----
    Row("out-occupied", _occupied, ("already exists", "--overwrite")),
    Row("out-parent-is-file", lambda c: ["import", str(c.hf), str(c.write("f", "x") / "out")],
        ("is a file", "choose another output path")),
    Row("out-newline", lambda c: ["import", str(c.hf), str(c.tmp / "a\nb")], ("newline",)),
    Row("out-sft-parent-is-file", lambda c: c.sft(f"train.out_dir={c.write('f', 'x') / 'run'}"), ("is a file",)),
    Row("make-tiny-occupied", lambda c: ["make-tiny", str(c.write("t/x", "x").parent)], ("already exists",)),
    Row("make-tiny-parent-is-file", lambda c: ["make-tiny", str(c.write("f", "x") / "t")], ("is a file",)),
    # ---- make-tiny ----
    Row("make-tiny-odd-head-dim", lambda c: ["make-tiny", str(c.tmp / "t"), "--head-dim", "31"],
        ("--head-dim=31 is odd",)),
    Row("make-tiny-top-k", lambda c: ["make-tiny", str(c.tmp / "t"), "--top-k", "16", "--experts", "8"],
        ("--top-k=16 exceeds --experts=8",)),
    Row("make-tiny-hidden", lambda c: ["make-tiny", str(c.tmp / "t"), "--hidden", "100"],
        ("--hidden=100 is not a multiple of 32",)),
    Row("make-tiny-layers", lambda c: ["make-tiny", str(c.tmp / "t"), "--layers", "0"], ("--layers",)),
    Row("make-tiny-heads", lambda c: ["make-tiny", str(c.tmp / "t"), "--heads", "6", "--kv-heads", "4"],
        ("--heads=6 is not a multiple of --kv-heads=4",)),
    Row("make-tiny-expert-width", lambda c: ["make-tiny", str(c.tmp / "t"), "--expert-width", "48"],
        ("--expert-width=48",)),
    # ---- plan ----
    Row("plan-world-zero", lambda c: ["plan", str(TINY_RECIPE), "--world-size", "0"], ("--world-size=0",)),
    Row("plan-world-negative", lambda c: ["plan", str(TINY_RECIPE), "--world-size", "-8"], ("--world-size=-8",)),
    Row("plan-tflops-zero", lambda c: ["plan", str(TINY_RECIPE), "--world-size", "8", "--tflops", "0"],
        ("--tflops=0",)),
    Row("plan-memory-negative", lambda c: ["plan", str(TINY_RECIPE), "--world-size", "8", "--gpu-memory-gib", "-5"],
        ("--gpu-memory-gib=-5",)),
    Row("plan-preset", lambda c: ["plan", str(TINY_RECIPE), "--world-size", "8", "--model", "gpt-5"],
        ("unknown model preset 'gpt-5'",)),
    Row("plan-layout", lambda c: ["plan", str(TINY_RECIPE), "--world-size", "3", "parallel.ep=3"],
        ("not divisible by ep=3",)),
    # ---- eval ----
    Row("eval-samples-zero", lambda c: ["eval", str(c.hf), "--data", "synthetic:arithmetic:2", "--samples", "0"],
        ("--samples=0",)),
    Row("eval-samples-negative", lambda c: ["eval", str(c.hf), "--data", "synthetic:arithmetic:2", "--samples",
                                            "-1"], ("--samples=-1",)),
    Row("eval-max-new-tokens", lambda c: ["eval", str(c.hf), "--data", "synthetic:arithmetic:2",
                                          "--max-new-tokens", "-5"], ("--max-new-tokens=-5",)),
    Row("eval-data-missing", lambda c: ["eval", str(c.hf), "--data", str(c.tmp / "no.jsonl")], ("no such data file",)),
    Row("eval-data-not-utf8", lambda c: ["eval", str(c.hf), "--data", str(c.write("u.jsonl", NOT_UTF8))],
        ("u.jsonl:1", "not UTF-8")),
    Row("eval-checker", lambda c: ["eval", str(c.hf), "--data", "synthetic:arithmetic:2", "--checker", "bogus"],
        ("--checker 'bogus'",)),
    Row("eval-truncated-shard", lambda c: ["eval", *_truncated_shard(c)[1:2], "--data", "synthetic:arithmetic:2"],
        ("model-00002-of-", "not a readable safetensors file")),
    Row("eval-second-checkpoint", _eval_two, ("no tokenizer.json",)),
    Row("eval-missing-checkpoint", lambda c: ["eval", str(c.tmp / "none"), "--data", "synthetic:arithmetic:2"],
        ("none", "no such checkpoint directory")),
    # ---- verify-export ----
    Row("verify-samples", lambda c: ["verify-export", str(c.hf), "--against", str(c.ckpt), "--samples", "0"],
        ("--samples=0",)),
    Row("verify-no-against", lambda c: ["verify-export", str(c.hf)], ("--against",)),
    # ---- launch (checks the recipe against the allocation before printing or submitting) ----
    Row("launch-local-nodes", lambda c: ["launch", "sft", str(SFT_RECIPE), f"checkpoint={c.ckpt}", "--local",
                                         "cluster.nodes=2", "cluster.gpus_per_node=1"], ("--local runs on one node",)),
    Row("launch-time", lambda c: ["launch", "pipeline", str(TINY_RECIPE), f"run_dir={c.tmp / 'run'}", "--print",
                                  "cluster.time=25:99:00"], ("cluster.time",)),
    Row("launch-layout", lambda c: ["launch", "pipeline", str(TINY_RECIPE), f"run_dir={c.tmp / 'run'}", "--print",
                                    "parallel.ep=3", "cluster.gpus_per_node=3"], ("not divisible by ep=3",)),
    Row("launch-pipeline-key", lambda c: ["launch", "pipeline", str(TINY_RECIPE), f"run_dir={c.tmp / 'run'}",
                                          "--print", "sft.train.global_batch_size=6", "sft.train.micro_batch_size=4"],
        ("sft.train.global_batch_size=6",)),
    Row("launch-seq-tp-te", lambda c: ["launch", "pipeline", str(TINY_RECIPE), f"run_dir={c.tmp / 'run'}",
                                       "--print", "model.impl=te", "parallel.tp=2", "data.seq_length=1001",
                                       "cluster.gpus_per_node=2"], ("data.seq_length=1001",)),
]


def test_the_table_is_wide():
    assert len(ROWS) >= 80 and len({r.name for r in ROWS}) == len(ROWS)
    kinds = {r.name.split("-")[0] for r in ROWS}
    assert {"data", "recipe", "override", "ckpt", "layout", "make", "plan", "eval", "launch", "export"} <= kinds


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt_meta):
    return tiny_ckpt_meta


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row, tiny_mxfp4, ckpt, tmp_path, capsys, monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in row.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    c = Ctx(tmp_path, tiny_mxfp4, ckpt)
    argv = row.argv(c)
    before = _files(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    if row.usage:
        assert lines[0].startswith("usage:"), err
        lines = [x for x in lines if not x.startswith(("usage:", " "))]
    assert len(lines) == 1 and "error:" in lines[0], err
    for word in row.words:
        assert word in lines[0], (word, lines[0])
    assert _files(tmp_path) == before, sorted(_files(tmp_path) - before)


def _files_with_partials(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from gptoss_nemo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_is_an_input_error_and_leaves_nothing(tmp_path):
    """A real write (make-tiny: the same atomic, sharded writer as import and export) that the file system refuses
    half-way: exit 2, one line naming the output, the partial directory removed."""
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, "make-tiny", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1
    assert "writing failed (File too large); the partial output was removed" in r.stderr and "out" in r.stderr
    assert _files_with_partials(tmp_path) == []


def test_too_little_free_space_is_refused_before_writing(tiny_mxfp4, tmp_path, capsys, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["import", str(tiny_mxfp4), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the output needs about 0.1 GiB and its file system has 0.0 GiB free" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


_KILLED = """
import os, signal, sys
from gptoss_nemo.checkpoint.writer import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write: no cleanup runs
"""


def test_a_killed_writer_leaves_nothing_complete_looking(tmp_path):
    r = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path / "out")], capture_output=True, timeout=120)
    assert r.returncode == -9
    left = _files_with_partials(tmp_path)
    assert not (tmp_path / "out").exists() and len(left) == 1 and left[0].startswith(".out.partial-")
    # the next run writes the output whole beside it
    assert main(["make-tiny", str(tmp_path / "out"), "--layers", "1"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: these commands would run")
@pytest.mark.parametrize("argv", [
    lambda c: ["import", str(c.hf), str(c.tmp / "out")],
    lambda c: ["export", str(c.ckpt), str(c.tmp / "out")],
    lambda c: [*c.sft()[:-2], "--local-spec"],  # no --dry-run
    lambda c: c.pipe()[:-2] + ["--local-spec"],
    lambda c: ["eval", str(c.ckpt), "--data", "synthetic:arithmetic:2"],
    lambda c: ["launch", "sft", str(SFT_RECIPE), f"checkpoint={c.ckpt}", "--local", "--local-spec"],
], ids=["import", "export", "sft", "pipeline", "eval-gptoss-nemo-checkpoint", "launch-local"])
def test_checked_but_no_gpu_exits_3(argv, tiny_mxfp4, ckpt, tmp_path, capsys, monkeypatch):
    """Everything checked, nothing run: exit 3, so `&&` chains and CI do not carry on as if the work was done."""
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    c = Ctx(tmp_path, tiny_mxfp4, ckpt)
    before = _files(tmp_path)
    assert main(argv(c)) == 3
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and ("GPU" in err), err
    assert _files(tmp_path) == before


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_in_a_checkpoint_is_refused_not_run(tmp_path, ckpt):
    """Where a checkpoint holds tensors, numbers and torch.distributed.checkpoint metadata, a pickled object that
    would run code (here: create a file) is refused: the DCP metadata (compat 11), DCP's byte items (compat 11,
    weights_only), a TE module's extra state (compat 12) and a rank's RNG file (train/state.py)."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from gptoss_nemo.compat import apply_megatron_patches
    from gptoss_nemo.convert.checkpoint_keys import checkpoint_entries
    from gptoss_nemo.errors import CheckpointError
    from gptoss_nemo.train.state import load_rng

    marker = tmp_path / "code-ran"
    assert "dcp_restricted_unpickle" in apply_megatron_patches()
    # a genuine DCP checkpoint with a byte item still loads
    good = tmp_path / "good"
    item = io.BytesIO()
    torch.save({"lr": 1e-4, "betas": (0.9, 0.95), "step": 3}, item)
    dcp.save({"w": torch.arange(4.0), "obj": item}, checkpoint_id=str(good), no_dist=True)
    loaded = {"w": torch.zeros(4), "obj": io.BytesIO()}
    dcp.load(loaded, checkpoint_id=str(good), no_dist=True)
    assert torch.equal(loaded["w"], torch.arange(4.0))
    # .metadata naming a callable
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    (bad / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                   "common_backend": "torch", "common_backend_version": 1}))
    with pytest.raises(CheckpointError, match=r"bad/.metadata: refused to unpickle pathlib.*Path.touch"):
        checkpoint_entries(bad)
    # a byte item holding one
    evil = io.BytesIO()
    torch.save({"x": _RunsCode(marker)}, evil)
    evil.seek(0)
    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}

    class _Item:
        class dest_index:
            fqn = "obj"

    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(_Item, evil)
    # a Transformer Engine module's extra state (compat 12 reads it with megatron's allowlist; TE is GPU-only, so
    # here the reader alone: FP8-style metadata loads, a pickled callable does not)
    from gptoss_nemo.compat import load_extra_state

    def as_bytes(obj):
        return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)

    fp8_meta = {"forward": {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.arange(12.0).reshape(4, 3),
                            "extra_fp8_variables": {"num_gemms": 1, "autocast": (True, "hybrid")}}}
    again = load_extra_state(as_bytes(fp8_meta))
    assert torch.equal(again["forward"]["amax_history_fwd"], fp8_meta["forward"]["amax_history_fwd"])
    with pytest.raises(pickle.UnpicklingError, match="pathlib"):
        load_extra_state(as_bytes({"forward": _RunsCode(marker)}))
    # a rank's RNG file
    rng = tmp_path / "rank_0.pt"
    torch.save({"cpu": torch.get_rng_state(), "tracker": _RunsCode(marker)}, rng)
    with pytest.raises(CheckpointError, match="rank_0.pt: holds more than RNG tensors"):
        load_rng(rng)
    torch.save({"cpu": torch.get_rng_state(), "cuda": [], "tracker": {}}, rng)
    assert torch.equal(load_rng(rng)["cpu"], torch.get_rng_state())
    assert not marker.exists()
