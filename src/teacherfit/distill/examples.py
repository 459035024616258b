"""Training examples for distillation: which (instruction, response) pairs, tokenized with response-only labels.

Sources: response sets as they are (sequence-level KD on a teacher's responses), or ``best_of_rank``: per
instruction, the response of the teacher whose per-sample CAR was best in a `teacherfit rank` run, or (GRAPE's rule)
the response the untuned student found most likely per token.
Each example is keyed by a hash of its whole conversation, so the offline teacher cache and the training
run agree on what an entry is, whatever file or order it came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from teacherfit.config import TrainData
from teacherfit.data import Record, TokenizedExample, load_records, record_id, tokenize_example
from teacherfit.scoring import pad_batch


def example_key(record: Record) -> str:
    """Content hash of the full conversation (prompt and response)."""
    return record_id(record.messages)


# per-sample value each rule maximises per instruction (ties: the first teacher in the rank run's order). GRAPE's is
# the length-normalised log-probability under the student, -loss_student (as `metrics.grape_selection` ranks).
BEST_OF_RANK_RULES = {"car": lambda s: s["car"], "grape": lambda s: -s["loss_student"]}


def best_of_rank(rank_run: Path, rule: str = "car") -> list[Record]:
    """Per instruction, the record of the teacher whose per-sample value under ``rule`` is best in a rank run."""
    import pyarrow.parquet as pq

    rank_run = Path(rank_run)
    missing = [f for f in ("results.json", "per_sample.parquet") if not (rank_run / f).is_file()]
    if missing:
        raise ValueError(f"data.best_of_rank: {rank_run} is not a finished `teacherfit rank` run (no "
                         f"{' or '.join(missing)}); give the --out folder of a rank run that completed")
    try:
        results = json.loads((rank_run / "results.json").read_text())
        samples = pq.read_table(rank_run / "per_sample.parquet").to_pylist()
        sets_of = results["response_sets"]
    except (ValueError, KeyError, OSError) as err:  # pyarrow's errors are ValueErrors/OSErrors
        raise ValueError(f"data.best_of_rank: {rank_run}: unreadable rank outputs ({err}); re-run rank") from None
    value = BEST_OF_RANK_RULES[rule]
    best: dict[str, tuple[float, dict]] = {}
    for s in samples:
        v = value(s) if s.get("car" if rule == "car" else "loss_student") is not None else math.nan
        if not math.isfinite(v):
            continue
        if s["id"] not in best or v > best[s["id"]][0]:
            best[s["id"]] = (v, s)
    sets = {name: {r.id: r for r in load_records(path, require_response=True).records}
            for name, path in sets_of.items()}
    chosen = []
    for sid, (v, s) in best.items():
        rec = sets[s["teacher"]][sid]
        chosen.append(Record(rec.id, rec.messages, rec.source, dict(rec.meta, chosen_by=f"best_per_sample_{rule}",
                                                                    chosen_value=v, chosen_from=s["teacher"])))
    return chosen


def training_records(cfg: TrainData) -> list[Record]:
    records: list[Record] = []
    for rs in cfg.responses:
        records += load_records(rs.path, require_response=True, on_error=cfg.on_error).records
    if cfg.best_of_rank is not None:
        records += best_of_rank(cfg.best_of_rank, cfg.best_of_rank_rule)
    if not records:
        raise ValueError("no training data: give data.responses or data.best_of_rank")
    seen, unique = set(), []
    for r in records:  # the same conversation twice would be trained on twice: keep one
        key = example_key(r)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique[: cfg.limit] if cfg.limit else unique


@dataclass
class TrainExample:
    key: str
    tokens: TokenizedExample


def tokenize_records(records: list[Record], tokenizer, max_length: int) -> tuple[list[TrainExample], dict[str, int]]:
    """Tokenize with response-only labels; count (never silently drop) truncated and unlearnable examples."""
    out, stats = [], {"records": len(records), "truncated": 0, "no_response_tokens": 0}
    for r in records:
        ex = tokenize_example(tokenizer, r.messages, max_length=max_length)
        stats["truncated"] += ex.truncated
        if ex.n_response_tokens == 0:
            stats["no_response_tokens"] += 1
            continue
        out.append(TrainExample(example_key(r), ex))
    stats["examples"] = len(out)
    return out, stats


@dataclass
class Micro:
    """One micro-batch: padded ids, mask, labels, and the example keys (for the cache and error messages)."""

    keys: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    @property
    def loss_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())

    @property
    def query_tokens(self) -> int:
        return int((self.labels != -100).sum())

    def select(self, rows: Tensor) -> Micro:
        """The sub-batch of these rows, at the same padded width (positions line up with the whole batch's)."""
        return Micro([self.keys[i] for i in rows.tolist()], self.input_ids.index_select(0, rows),
                     self.attention_mask.index_select(0, rows), self.labels.index_select(0, rows))


def collate(examples: list[TrainExample], pad_id: int) -> Micro:
    ids, mask = pad_batch([e.tokens.input_ids for e in examples], pad_id)
    labels, _ = pad_batch([e.tokens.labels for e in examples], -100)
    return Micro([e.key for e in examples], ids, mask, labels)
