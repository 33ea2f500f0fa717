"""Conversations on disk -> validated, rendered, tokenized, split and packed training sequences.

Sources: JSONL files (one conversation per line), parquet files (a `messages` column, optional `tools`), or
`synthetic:TASK:N[:SEED[:DIGITS]]` (the checkable tasks of synthetic.py: arithmetic, multiplication). A malformed
line is reported as `file:line: what is wrong`; if more than `max_bad_fraction` of the lines are malformed the run
stops here, before any GPU time.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gptoss_nemo.data import synthetic
from gptoss_nemo.data.conversation import parse_conversation
from gptoss_nemo.data.harmony import RenderOptions, encode
from gptoss_nemo.data.packing import Document, Sequence, fit, pack
from gptoss_nemo.errors import ConfigError, DataError

log = logging.getLogger(__name__)
SYNTHETIC = "synthetic:"


@dataclass(kw_only=True, slots=True)
class DataConfig:
    train: list[str]
    validation: list[str] = field(default_factory=list)  # empty: split validation_fraction off train
    validation_fraction: float = 0.05
    seq_length: int = 4096
    packing: bool = True
    overlong: str = "truncate"  # or "drop"
    loss_on: str = "assistant"  # "assistant" | "final" | "last_turn"
    reasoning_effort: str = "medium"
    current_date: str | None = None
    max_bad_fraction: float = 0.01
    seed: int = 1234

    def __post_init__(self):
        if not self.train:
            raise ConfigError("data.train is empty; give JSONL/parquet files or synthetic:arithmetic:N")
        if self.overlong not in ("truncate", "drop"):
            raise ConfigError(f"data.overlong={self.overlong!r}; use truncate or drop")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"data.validation_fraction={self.validation_fraction} must be in [0, 1)")
        if self.seq_length < 16:
            raise ConfigError(f"data.seq_length={self.seq_length} is too short")
        self.render_options()  # checks loss_on and reasoning_effort

    def render_options(self) -> RenderOptions:
        return RenderOptions(loss_on=self.loss_on, reasoning_effort=self.reasoning_effort,
                             current_date=self.current_date)


@dataclass(slots=True)
class DataStats:
    lines: int = 0
    bad: int = 0
    outcomes: Counter = field(default_factory=Counter)  # kept / truncated / dropped_overlong / dropped_no_loss
    tokens: int = 0
    loss_tokens: int = 0
    first_errors: list[str] = field(default_factory=list)


def read_records(source: str) -> Iterator[tuple[str, object]]:
    """(where, record) per conversation; `record` is a DataError when the line cannot even be parsed."""
    if source.startswith(SYNTHETIC):
        task, *spec = source[len(SYNTHETIC):].split(":")
        if task not in synthetic.TASKS or not 1 <= len(spec) <= 3 or not all(x.isdigit() for x in spec) or (
                len(spec) == 3 and int(spec[2]) not in synthetic.DIGITS):
            raise DataError(f"{source}: use synthetic:TASK:N, synthetic:TASK:N:SEED (a held-out set: another SEED) "
                            "or synthetic:TASK:N:SEED:DIGITS (operands of at most DIGITS = 1, 2 or 3 digits), TASK "
                            f"one of {', '.join(synthetic.TASKS)}")
        n, seed, digits = (*map(int, spec), *(0, 3)[len(spec) - 1:])
        for i, r in enumerate(synthetic.records(n, seed=seed, digits=digits, task=task)):
            yield f"{source}#{i}", r
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}:row {i}", row
        return
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield f"{path}:{i}", DataError(f"not valid JSON ({e.msg} at column {e.colno})")


def tokenize_sources(sources: list[str], tokenizer, cfg: DataConfig, stats: DataStats) -> list[Document]:
    opts = cfg.render_options()
    docs = []
    for source in sources:
        for where, record in read_records(source):
            stats.lines += 1
            try:
                if isinstance(record, DataError):
                    raise record
                ids, loss = encode(parse_conversation(record), tokenizer, opts)
            except DataError as e:
                stats.bad += 1
                if len(stats.first_errors) < 20:
                    stats.first_errors.append(f"{where}: {e}")
                continue
            doc, outcome = fit(Document(ids, loss), cfg.seq_length, cfg.overlong)
            stats.outcomes[outcome] += 1
            if doc is not None:
                stats.tokens += len(doc.ids)
                stats.loss_tokens += sum(doc.loss[1:])
                docs.append(doc)
    if stats.lines == 0:
        raise DataError(f"{', '.join(sources)}: no conversations found")
    if stats.bad / stats.lines > cfg.max_bad_fraction:
        raise DataError(f"{stats.bad} of {stats.lines} conversations are malformed ({stats.bad / stats.lines:.1%} > "
                        f"data.max_bad_fraction={cfg.max_bad_fraction}); first: {stats.first_errors[0]}")
    for message in stats.first_errors:
        log.warning("skipped malformed conversation %s", message)
    return docs


def build_datasets(cfg: DataConfig, tokenizer, pad_id: int) -> tuple[list[Sequence], list[Sequence], DataStats]:
    """(train sequences, validation sequences, stats). Shuffling and the split depend on cfg.seed only."""
    stats = DataStats()
    docs = tokenize_sources(cfg.train, tokenizer, cfg, stats)
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    if cfg.validation:
        valid = tokenize_sources(cfg.validation, tokenizer, cfg, stats)
    else:
        n_valid = round(len(docs) * cfg.validation_fraction)
        if cfg.validation_fraction > 0 and len(docs) > 1:
            n_valid = max(n_valid, 1)
        valid, docs = docs[:n_valid], docs[n_valid:]
    if not docs:
        raise DataError("no training conversation is left after dropping overlong ones and the validation split")
    return (pack(docs, cfg.seq_length, pad_id, cfg.packing), pack(valid, cfg.seq_length, pad_id, cfg.packing), stats)
