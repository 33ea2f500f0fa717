"""Conversations on disk -> validated, rendered, tokenized, split and packed training sequences.

Sources: JSONL files (one conversation per line), parquet files (a `messages` column, optional `tools`), or
`synthetic:TASK:N[:SEED[:DIGITS]]` (the checkable tasks of synthetic.py: arithmetic, multiplication). A malformed
line is reported as `file:line: what is wrong`; if more than `max_bad_fraction` of the lines are malformed the run
stops here, before any GPU time.

A conversation longer than `seq_length` tokens ("overlong") is, by `overlong`:
    drop (default)  left out, with a warning: how many conversations and tokens, the first few file:line; more than
                    `max_dropped_fraction` of the conversations (or of their tokens) stops the run here
    truncate        cut to its first `seq_length` tokens (the loss mask cut with it, so what is kept is trained
                    exactly as before; a reasoning trace loses its end, often its final answer); warned with the
                    same counts. One whose kept part has no loss token left is dropped as overlong
    error           the run stops here, naming them
The length distribution (tokens per conversation: p50, p90, p99, max) is in the stats the dry runs print.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
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
OVERLONG = ("drop", "truncate", "error")
SHOWN = 5  # file:line examples in a message


@dataclass(kw_only=True, slots=True)
class DataConfig:
    train: list[str]
    validation: list[str] = field(default_factory=list)  # empty: split validation_fraction off train
    validation_fraction: float = 0.05
    seq_length: int = 4096
    packing: bool = True
    overlong: str = "drop"  # conversations longer than seq_length: drop | truncate | error (module docstring)
    max_dropped_fraction: float = 0.05  # of conversations or tokens dropped as overlong, above which the run stops
    loss_on: str = "assistant"  # "assistant" | "final" | "last_turn"
    reasoning_effort: str = "medium"
    current_date: str | None = None
    max_bad_fraction: float = 0.01
    seed: int = 1234

    def __post_init__(self):
        if not self.train:
            raise ConfigError("data.train is empty; give JSONL/parquet files or synthetic:arithmetic:N")
        if self.overlong not in OVERLONG:
            raise ConfigError(f"data.overlong={self.overlong!r}; use one of {', '.join(OVERLONG)}")
        for key in ("max_bad_fraction", "max_dropped_fraction"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be a fraction in [0, 1]")
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
    tokens: int = 0  # in the kept (possibly truncated) conversations
    loss_tokens: int = 0
    first_errors: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens of every well-formed conversation, as rendered
    dropped_tokens: int = 0  # in conversations dropped as overlong
    cut_tokens: int = 0  # cut off the ends of truncated conversations
    first_overlong: list[str] = field(default_factory=list)  # "file:line (N tokens)"

    def length_distribution(self) -> dict[str, int]:
        """Tokens per conversation: p50, p90, p99 (nearest rank) and max."""
        if not self.lengths:
            return {}
        xs = sorted(self.lengths)
        rank = lambda q: xs[max(math.ceil(q * len(xs)) - 1, 0)]  # noqa: E731
        return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": xs[-1]}

    def summary(self) -> dict:
        """What the dry runs and the training log print."""
        return {"lines": self.lines, "bad": self.bad, **self.outcomes, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens, "overlong_dropped_tokens": self.dropped_tokens,
                "overlong_cut_tokens": self.cut_tokens,
                "tokens_per_conversation": self.length_distribution()}


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
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file; list its .jsonl/.parquet files in data.train")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        yield from _parquet_records(path)
        return
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{i}", DataError(f"not UTF-8 text (byte {e.start} of the line); re-encode the file "
                                               "as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield f"{path}:{i}", DataError(f"not valid JSON ({e.msg} at column {e.colno})")


def _parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]}); rewrite it or convert it "
                        "to JSONL") from None
    for i, row in enumerate(rows, start=1):
        yield f"{path}:row {i}", row


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
            stats.lengths.append(len(ids))
            doc, outcome = fit(Document(ids, loss), cfg.seq_length, cfg.overlong)
            stats.outcomes[outcome] += 1
            if outcome in ("truncated", "dropped_overlong"):
                if doc is None:
                    stats.dropped_tokens += len(ids)
                else:
                    stats.cut_tokens += len(ids) - len(doc.ids)
                if len(stats.first_overlong) < SHOWN:
                    stats.first_overlong.append(f"{where} ({len(ids)} tokens)")
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


def check_overlong(stats: DataStats, cfg: DataConfig) -> None:
    """The overlong rule's report: a warning with the counts, or a stop (data.overlong=error, or more dropped than
    data.max_dropped_fraction of the conversations or of their tokens)."""
    dropped, truncated = stats.outcomes["dropped_overlong"], stats.outcomes["truncated"]
    if not dropped + truncated:
        return
    good, total = stats.lines - stats.bad, sum(stats.lengths)
    what = f"{dropped + truncated} of {good} conversations ({(dropped + truncated) / good:.1%}) are longer than " \
           f"data.seq_length={cfg.seq_length} tokens"
    where = f"first: {', '.join(stats.first_overlong)}; tokens per conversation: " \
            + ", ".join(f"{k} {v}" for k, v in stats.length_distribution().items())
    if cfg.overlong == "error":
        raise DataError(f"{what} (data.overlong=error); {where}; raise data.seq_length, or set data.overlong=drop "
                        "or truncate")
    done = []
    if truncated:
        done.append(f"{truncated} truncated to their first {cfg.seq_length} tokens ({stats.cut_tokens} of {total} "
                    f"tokens, {stats.cut_tokens / total:.1%}, cut)")
    if dropped:
        why = " (truncated, they kept no token to train on)" if cfg.overlong == "truncate" else ""
        done.append(f"{dropped} dropped{why} ({stats.dropped_tokens} of {total} tokens, "
                    f"{stats.dropped_tokens / total:.1%})")
    share = max(dropped / good, stats.dropped_tokens / total)
    if share > cfg.max_dropped_fraction:
        alternative = ", set data.overlong=truncate" if cfg.overlong == "drop" else ""
        raise DataError(f"{what}: {'; '.join(done)}: {share:.1%} of the conversations or tokens dropped, more than "
                        f"data.max_dropped_fraction={cfg.max_dropped_fraction}; {where}; raise data.seq_length"
                        f"{alternative}, or raise data.max_dropped_fraction to accept it")
    log.warning("data: %s: %s (data.overlong=%s); %s; raise data.seq_length to train on them whole", what,
                "; ".join(done), cfg.overlong, where)


def length_report(cfg: DataConfig, tokenizer) -> dict:
    """Tokens per conversation of the training data, and how many exceed data.seq_length (nothing stops: `plan`)."""
    stats = DataStats()
    tokenize_sources(cfg.train, tokenizer, dataclasses.replace(cfg, overlong="truncate", max_bad_fraction=1.0), stats)
    return {"conversations": stats.lines - stats.bad, "malformed": stats.bad,
            "tokens_per_conversation": stats.length_distribution(),
            "longer_than_seq_length": sum(n > cfg.seq_length for n in stats.lengths)}


def build_datasets(cfg: DataConfig, tokenizer, pad_id: int) -> tuple[list[Sequence], list[Sequence], DataStats]:
    """(train sequences, validation sequences, stats). Shuffling and the split depend on cfg.seed only."""
    stats = DataStats()
    docs = tokenize_sources(cfg.train, tokenizer, cfg, stats)
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    if cfg.validation:
        valid = tokenize_sources(cfg.validation, tokenizer, cfg, stats)
    check_overlong(stats, cfg)
    if not cfg.validation:
        n_valid = round(len(docs) * cfg.validation_fraction)
        if cfg.validation_fraction > 0 and len(docs) > 1:
            n_valid = max(n_valid, 1)
        valid, docs = docs[:n_valid], docs[n_valid:]
    if not docs:
        raise DataError("no training conversation is left after dropping overlong ones and the validation split; "
                        "give more data or raise data.seq_length")
    return (pack(docs, cfg.seq_length, pad_id, cfg.packing), pack(valid, cfg.seq_length, pad_id, cfg.packing), stats)
