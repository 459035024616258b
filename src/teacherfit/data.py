"""Records, dataset formats, chat rendering and response-only labels (data layer).

Every dataset we read (Alpaca, ShareGPT or OpenAI-messages rows; JSONL, JSON, Parquet or Arrow files, a
``datasets`` ``save_to_disk`` folder, or a Hugging Face Hub dataset id) becomes a list of ``Record``: chat messages plus everything else the row carried (teacher provenance, decoding
settings...) in ``meta``. A record's id is derived from its prompt, so the same prompt has the same id
in every file and format: ids join teacher responses, scores and student outputs across runs.

Nothing here imports models: tokenizers are passed in by the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teacherfit.store import atomic_write_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FORMATS = ("alpaca", "sharegpt", "messages")
SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")

# ShareGPT speaker names seen in the wild, mapped to chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}

# The field that marks each format, in the order auto-detection tries them.
_FORMAT_KEYS = {"messages": "messages", "conversations": "sharegpt", "instruction": "alpaca"}


def record_id(prompt: list[dict[str, str]]) -> str:
    """Content-derived id of a prompt: first 16 hex chars of the sha256 of its canonical JSON.

    Only ``role`` and ``content`` enter the hash, with sorted keys and no whitespace, so the id does not
    depend on the file, the format or the key order the prompt was read from.
    """
    canonical = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in prompt],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


@dataclass
class Record:
    """One chat example: a prompt and, when present, the assistant response that ends it.

    ``source`` says where the row was read from; it is left out of equality so that the same row read
    from two files compares equal.
    """

    id: str
    messages: list[dict[str, str]]
    source: str = field(default="", compare=False)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_messages(
        cls, messages: list[dict[str, str]], *, source: str = "", meta: dict[str, Any] | None = None
    ) -> Record:
        """A record whose id is derived from the prompt part of ``messages``."""
        record = cls(id="", messages=messages, source=source, meta=dict(meta or {}))
        record.id = record_id(record.prompt)
        return record

    @property
    def prompt(self) -> list[dict[str, str]]:
        """Messages before the last assistant turn; all messages when the last one is not an assistant turn."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def response(self) -> str | None:
        """Content of the last message when it is an assistant turn, else None."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None

    def with_response(self, text: str, **meta: Any) -> Record:
        """The same prompt (and id) answered by ``text``; ``meta`` updates a copy of this record's meta."""
        messages = [dict(m) for m in self.prompt] + [{"role": "assistant", "content": text}]
        return replace(self, messages=messages, meta={**self.meta, **meta})

    def to_row(self) -> dict[str, Any]:
        """The OpenAI-messages JSON row we write: ``{"id", "messages", **meta}``; it loads back equal."""
        clash = {"id", "messages"} & self.meta.keys()
        if clash:
            raise ValueError(f"record {self.id}: meta may not use the row's own field names {sorted(clash)}")
        return {"id": self.id, "messages": self.messages, **self.meta}


class DataError(ValueError):
    """A dataset problem; the message always names the file and the line (JSONL) or index (JSON, Parquet)."""

    def __init__(self, message: str, path: str | os.PathLike, line: int | None = None, index: int | None = None):
        super().__init__(message)
        self.path = str(path)
        self.line = line
        self.index = index


@dataclass
class LoadReport:
    """What ``load_records`` kept, skipped and noticed in one file."""

    path: str
    format: str
    n_rows: int
    records: list[Record]
    malformed: list[tuple[str, str]] = field(default_factory=list)
    empty_responses: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for humans, e.g. ``x.jsonl: 120 rows (alpaca) -> 118 records; 1 malformed skipped, ...``."""
        return (
            f"{Path(self.path).name}: {_count(self.n_rows, 'row')} ({self.format}) -> "
            f"{_count(len(self.records), 'record')}; {len(self.malformed)} malformed skipped, "
            f"{_count(len(self.duplicate_ids), 'duplicate id')}, "
            f"{_count(len(self.empty_responses), 'empty response')}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything but the records themselves, for run reports."""
        return {
            "path": self.path,
            "format": self.format,
            "n_rows": self.n_rows,
            "n_records": len(self.records),
            "malformed": [{"location": loc, "reason": reason} for loc, reason in self.malformed],
            "empty_responses": list(self.empty_responses),
            "duplicate_ids": list(self.duplicate_ids),
        }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# ---------------------------------------------------------------------------------------------- reading


class _RowError(Exception):
    """Why one row is malformed (turned into a DataError or a ``malformed`` entry by the loader)."""


@dataclass
class _RawRow:
    location: str  # "path:LINE" or "path:#INDEX"
    line: int | None
    index: int | None
    value: Any  # the decoded row, or a _RowError when the row could not even be decoded


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; supported: {', '.join(SUFFIXES)}", path
        )
    return suffix


def _iter_jsonl(path: Path) -> Iterator[_RawRow]:
    # Lines are decoded one by one so that a bad line is one malformed row, not a failed file.
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            location = f"{path}:{number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                yield _RawRow(location, number, None, _RowError("line is not valid UTF-8"))
                continue
            if not text.strip():
                continue
            try:
                value: Any = json.loads(text)
            except json.JSONDecodeError as exc:
                value = _RowError(f"invalid JSON ({exc.msg} at column {exc.colno})")
            except RecursionError:
                value = _RowError("JSON nested too deeply to be a record")
            yield _RawRow(location, number, None, value)


def _iter_json(path: Path) -> Iterator[_RawRow]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        message = f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
        raise DataError(message, path, exc.lineno) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})", path) from exc
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a dataset", path) from None
    if isinstance(doc, dict):
        doc = next((doc[k] for k in ("data", "rows") if isinstance(doc.get(k), list)), doc)
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of objects, or an object with a 'data' or 'rows' list", path)
    for index, value in enumerate(doc):
        yield _RawRow(f"{path}:#{index}", None, index, value)


def _iter_parquet(path: Path) -> Iterator[_RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: cannot read as Parquet ({exc})", path) from exc
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            # Every row has every column; a null is how Parquet says a field was absent from the row.
            value = {k: v for k, v in value.items() if v is not None}
            yield _RawRow(f"{path}:#{index}", None, index, _unpack_meta_json(value))
            index += 1


# ---- Hugging Face `datasets`: Arrow files, save_to_disk folders, hub ids


@dataclass(frozen=True)
class HubSpec:
    """``ORG/NAME?split=train_sft&subset=default&revision=abc123`` (every option optional): a Hub dataset."""

    name: str
    split: str | None = None
    subset: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        opts = "&".join(f"{k}={v}" for k, v in (("split", self.split), ("subset", self.subset),
                                                 ("revision", self.revision)) if v)
        return self.name + (f"?{opts}" if opts else "")


_HUB_OPTIONS = ("split", "subset", "revision")


def parse_source(spec: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """Split ``PATH?split=...`` into the path part and its options (a save_to_disk DatasetDict needs a split)."""
    text = os.fspath(spec)
    if "?" not in text:
        return Path(text), {}
    from urllib.parse import parse_qsl

    base, query = text.split("?", 1)
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_HUB_OPTIONS))
    if unknown:
        raise DataError(f"{text}: unknown dataset option {unknown[0]!r}; use {', '.join(_HUB_OPTIONS)} "
                        "(e.g. ORG/NAME?split=train&subset=default&revision=main)", text)
    return Path(base), options


def is_hub_id(spec: str | os.PathLike) -> bool:
    """A Hub dataset id (``ORG/NAME`` or ``NAME``, options allowed) rather than a local path: no such path exists,
    no data-file suffix, and only the characters hub ids allow."""
    import re

    path, _ = parse_source(spec)
    text = os.fspath(spec).split("?", 1)[0]
    if path.exists() or path.suffix.lower() in SUFFIXES or text.startswith((".", "/", "~")):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", text) is not None


def _dataset_rows(dataset: Any, label: str) -> Iterator[_RawRow]:
    """Rows of a ``datasets.Dataset`` as raw rows located as ``LABEL#INDEX`` (row errors name both)."""
    index = 0
    for batch in dataset.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            value = {k: v for k, v in zip(columns, values) if v is not None}
            yield _RawRow(f"{label}#{index}", None, index, _unpack_meta_json(value))
            index += 1


def _pick_split(loaded: Any, split: str | None, label: str) -> Any:
    """A DatasetDict's split: the one named, or the only one; several and none named is an error."""
    if not hasattr(loaded, "keys"):  # already a Dataset
        if split:
            raise DataError(f"{label}: this dataset has no splits; remove ?split={split}", label)
        return loaded
    splits = list(loaded.keys())
    if split is None:
        if len(splits) == 1:
            return loaded[splits[0]]
        raise DataError(f"{label}: the dataset has splits {', '.join(splits)}; name one, e.g. {label}?split={splits[0]}",
                        label)
    if split not in loaded:
        raise DataError(f"{label}: no split {split!r}; it has {', '.join(splits)}", label)
    return loaded[split]


def _iter_arrow(path: Path) -> Iterator[_RawRow]:
    from datasets import Dataset

    try:
        dataset = Dataset.from_file(str(path))
    except Exception as exc:  # pyarrow raises several types for a file that is not an Arrow stream
        raise DataError(f"{path}: cannot read as an Arrow file written by `datasets` ({exc})", path) from exc
    yield from _dataset_rows(dataset, str(path))


def _iter_saved(folder: Path, options: dict[str, str]) -> Iterator[_RawRow]:
    from datasets import load_from_disk

    if not any((folder / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        raise DataError(f"{folder}: a folder, but not one written by `datasets`' save_to_disk (no dataset_info.json "
                        f"or dataset_dict.json); give a data file ({', '.join(SUFFIXES)}) or such a folder", folder)
    extra = set(options) - {"split"}
    if extra:
        raise DataError(f"{folder}: a saved dataset takes only ?split=..., not {sorted(extra)[0]}", folder)
    try:
        loaded = load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(f"{folder}: cannot load the saved dataset ({exc})", folder) from exc
    label = str(folder) + (f"?split={options['split']}" if "split" in options else "")
    yield from _dataset_rows(_pick_split(loaded, options.get("split"), str(folder)), label)


def _iter_hub(spec: str) -> Iterator[_RawRow]:
    """A Hub dataset through ``datasets.load_dataset`` (its cache, its download bars; offline: its cache only)."""
    from datasets import load_dataset

    path, options = parse_source(spec)
    hub = HubSpec(os.fspath(path), options.get("split"), options.get("subset"), options.get("revision"))
    try:
        loaded = load_dataset(hub.name, hub.subset, split=hub.split, revision=hub.revision)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = (" (HF_HUB_OFFLINE is set and it is not in the local cache: download it once online, or save it "
                "with save_to_disk and give the folder)") if offline else \
            " (check the id, ?subset=, ?split= and ?revision=; a gated dataset needs `hf auth login` or HF_TOKEN)"
        reason = " ".join(str(exc).split())[:300]
        raise DataError(f"{hub}: cannot load the Hub dataset: {reason}{hint}", str(hub)) from None
    yield from _dataset_rows(_pick_split(loaded, None, str(hub)), str(hub))


def _open_rows(spec: str | os.PathLike) -> tuple[Iterator[_RawRow], Path]:
    """The rows of any data source teacherfit reads, and the path naming it in messages."""
    path, options = parse_source(spec)
    if path.is_dir():
        return _iter_saved(path, options), path
    if not path.is_file() and is_hub_id(spec):
        return _iter_hub(os.fspath(spec)), Path(os.fspath(spec))
    suffix = _check_suffix(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file", path)
    if options:
        raise DataError(f"{path}: options ({'&'.join(options)}) apply to a Hub dataset or a saved folder only", path)
    reader = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet, ".arrow": _iter_arrow}[suffix]
    return reader(path), path


def _unpack_meta_json(row: dict[str, Any]) -> Any:
    """Undo ``write_records``' Parquet layout: the ``meta_json`` column holds the meta fields as JSON."""
    if "meta_json" not in row:
        return row
    row = dict(row)
    encoded = row.pop("meta_json")
    try:
        meta = json.loads(encoded)
    except (TypeError, json.JSONDecodeError) as exc:
        return _RowError(f"'meta_json' is not valid JSON ({exc})")
    if not isinstance(meta, dict):
        return _RowError("'meta_json' must encode a JSON object")
    return {**meta, **row}


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800"): no tokenizer or file can take it
        raise _RowError(f"{what} holds a lone surrogate ({value[exc.start]!r} at character {exc.start}): "
                        "not valid Unicode text; fix or remove it") from None
    return value


def _parse_alpaca(row: dict[str, Any]) -> tuple[list[dict[str, str]], set[str]]:
    if row.get("instruction") is None:
        raise _RowError("missing 'instruction' (alpaca rows need 'instruction', optional 'input' and 'output')")
    instruction = _text(row["instruction"], "'instruction'")
    # None means "not given" for every optional field (JSON null, or a Parquet null).
    extra = _text(row.get("input") or "", "'input'")
    user = "\n\n".join(part for part in (instruction, extra) if part)  # "{instruction}\n\n{input}"
    if not user.strip():
        raise _RowError("empty 'instruction' and 'input': no user turn")
    messages = []
    if row.get("system") is not None:
        messages.append({"role": "system", "content": _text(row["system"], "'system'")})
    messages.append({"role": "user", "content": user})
    if row.get("output") is not None:
        messages.append({"role": "assistant", "content": _text(row["output"], "'output'")})
    return messages, {"instruction", "input", "output", "system"}


def _parse_sharegpt(row: dict[str, Any]) -> tuple[list[dict[str, str]], set[str]]:
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise _RowError("missing 'conversations' list (sharegpt rows are {'conversations': [{'from', 'value'}, ...]})")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _RowError(f"conversations[{i}] must be an object with 'from' and 'value'")
        speaker = _text(turn["from"], f"conversations[{i}].from")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise _RowError(f"conversations[{i}]: unknown speaker {speaker!r}; known: {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": _text(turn["value"], f"conversations[{i}].value")})
    return messages, {"conversations"}


def _message_content(content: Any, where: str) -> str:
    """A message's text; OpenAI content given as a list of text parts is joined with newlines."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _RowError(f"{where}.content[{j}]: only text parts are supported")
            texts.append(_text(part.get("text"), f"{where}.content[{j}].text"))
        return "\n".join(texts)
    return _text(content, f"{where}.content")


def _parse_messages(row: dict[str, Any]) -> tuple[list[dict[str, str]], set[str]]:
    turns = row.get("messages")
    if not isinstance(turns, list):
        raise _RowError("missing 'messages' list (rows are {'messages': [{'role', 'content'}, ...]})")
    messages = []
    for i, message in enumerate(turns):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _RowError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise _RowError(f"messages[{i}]: unknown role {role!r}; known: {', '.join(ROLES)}")
        messages.append({"role": role, "content": _message_content(message["content"], f"messages[{i}]")})
    return messages, {"messages"}


_PARSERS = {"alpaca": _parse_alpaca, "sharegpt": _parse_sharegpt, "messages": _parse_messages}


def _detect_format(row: dict[str, Any]) -> str:
    for key, name in _FORMAT_KEYS.items():
        if key in row:
            return name
    raise _RowError(
        "cannot tell the format: expected 'instruction' (alpaca), 'conversations' (sharegpt) "
        f"or 'messages' (openai messages); row has {sorted(row)[:8]}"
    )


def _to_record(row: dict[str, Any], fmt: str, location: str, require_response: bool) -> Record:
    messages, used = _PARSERS[fmt](row)
    if not messages:
        raise _RowError("no messages")
    record = Record.from_messages(messages, source=location)
    if not any(m["role"] == "user" for m in record.prompt):
        raise _RowError("no user turn in the prompt")
    if require_response and record.response is None:
        raise _RowError("no response: the last turn is not an assistant turn (require_response=True)")
    meta = {k: v for k, v in row.items() if k not in used and k != "id"}
    # A row's own "id" is provenance, kept as "source_id"; an id equal to ours is one we wrote ourselves.
    if row.get("id") is not None and row["id"] != record.id and "source_id" not in meta:
        meta["source_id"] = row["id"]
    record.meta = meta
    return record


def load_records(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    on_error: str = "stop",
    require_response: bool = False,
    limit: int | None = None,
    allow_empty: bool = False,
) -> LoadReport:
    """Read a dataset file into records, with an account of what was skipped.

    ``format`` is "auto" (decided by the first row that shows one, then held for the whole file) or one
    of "alpaca", "sharegpt", "messages". A malformed row raises DataError (``on_error="stop"``) or is
    counted in ``malformed`` and skipped (``"skip"``). Rows repeating a kept id are dropped and counted;
    empty responses are kept and counted. ``limit`` stops after that many kept records. When every row
    is malformed and skipped, that is an error (a run on nothing would look like success), unless
    ``allow_empty`` (``inspect-data``: the report is the point); the report's format is then "unknown".
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    rows, path = _open_rows(path)

    fmt = None if format == "auto" else format
    report = LoadReport(path=str(path), format=fmt or "unknown", n_rows=0, records=[])
    seen: set[str] = set()
    for raw in rows:
        if limit is not None and len(report.records) >= limit:
            break
        report.n_rows += 1
        try:
            if isinstance(raw.value, _RowError):
                raise raw.value
            if not isinstance(raw.value, dict):
                raise _RowError(f"row must be a JSON object, got {type(raw.value).__name__}")
            fmt = fmt or _detect_format(raw.value)
            record = _to_record(raw.value, fmt, raw.location, require_response)
        except _RowError as exc:
            if on_error == "stop":
                raise DataError(
                    f"{raw.location}: {exc}; to skip and count such rows set on_error: skip (the `on_error` "
                    "field of the section that names this file, e.g. --set on_error=skip or --set "
                    "data.on_error=skip; inspect-data: --on-error skip)",
                    path,
                    raw.line,
                    raw.index,
                ) from None
            report.malformed.append((raw.location, str(exc)))
            continue
        if record.id in seen:
            report.duplicate_ids.append(record.id)
            continue
        seen.add(record.id)
        if record.response is not None and not record.response.strip():
            report.empty_responses.append(record.id)
        report.records.append(record)
    if report.n_rows == 0:
        raise DataError(f"{path}: no rows", path)
    if not report.records and report.malformed and not allow_empty:
        location, reason = report.malformed[0]
        raise DataError(f"{path}: all {report.n_rows} rows are malformed (first, {location}: {reason}); "
                        "nothing to use", path)
    report.format = fmt or "unknown"
    return report


# ---------------------------------------------------------------------------------------------- writing


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> Path:
    """Write records atomically as JSONL, JSON or Parquet (by suffix), one ``to_row()`` per record.

    Parquet has fixed columns, so the free-form meta fields travel as one JSON string column
    ``meta_json`` (``load_records`` unpacks it); messages are a list of ``{role, content}`` structs.
    """
    path = Path(path)
    suffix = _check_suffix(path)
    if suffix == ".arrow":
        raise DataError(f"{path}: write response sets as .jsonl, .json or .parquet (Arrow is read only)", path)
    rows = [r.to_row() for r in records]
    if suffix == ".jsonl":
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    elif suffix == ".json":
        data = (json.dumps(rows, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    else:
        data = _parquet_bytes(rows)
    atomic_write_bytes(path, data)
    return path


def _parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("messages", pa.list_(message)), ("meta_json", pa.string())])
    table = pa.table(
        {
            "id": [row["id"] for row in rows],
            "messages": [row["messages"] for row in rows],
            "meta_json": [
                json.dumps({k: v for k, v in row.items() if k not in ("id", "messages")}, ensure_ascii=False)
                for row in rows
            ],
        },
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------------------------ chat rendering, labels

# For base models that ship no chat template. The assistant turn ends with the EOS token so that a model
# trained on it learns to stop; BOS is written when the tokenizer has one because rendered text is
# tokenized without special tokens (as with real templates, which carry their own BOS).
PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Assistant:\n' + message['content'] + (eos_token | default('')) + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer ships its own chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_template_for(tokenizer: PreTrainedTokenizerBase) -> tuple[str, bool]:
    """The template to render with, and whether it is ``PLAIN_CHAT_TEMPLATE`` (the tokenizer had none)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is the chat template
        template = template.get("default")
    if template:
        return template, False
    return PLAIN_CHAT_TEMPLATE, True


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """Messages rendered as text by the tokenizer's chat template (or the plain one)."""
    template, _ = chat_template_for(tokenizer)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class TokenizedExample:
    """Token ids with next-token labels: -100 everywhere except on the labelled assistant tokens."""

    input_ids: list[int]
    labels: list[int]
    n_prompt_tokens: int
    n_response_tokens: int
    truncated: bool


def _finish(input_ids: list[int], labels: list[int], max_length: int | None) -> TokenizedExample:
    """Truncate from the right (ids and labels together) and count prompt and labelled tokens."""
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    return TokenizedExample(
        input_ids=input_ids,
        labels=labels,
        n_prompt_tokens=labelled[0] if labelled else len(input_ids),
        n_response_tokens=len(labelled),
        truncated=truncated,
    )


def _labels_by_prefix(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], turns: list[int]
) -> tuple[list[int], list[int]] | None:
    """Label each assistant turn k as the tokens that render(messages[:k+1]) adds to render(messages[:k]).

    This labels exactly what the template writes for the turn (content and end-of-turn tokens) and
    nothing it writes for the prompt. It needs the template to be prefix-stable: the rendered prompt's
    tokens must begin the rendered turn's tokens, and every turn's tokens must begin the whole
    conversation's. Returns None when that does not hold.
    """
    last = turns[-1]
    input_ids = _encode(tokenizer, render_prompt(tokenizer, messages[: last + 1], add_generation_prompt=False))
    labels = [IGNORE_INDEX] * len(input_ids)
    for k in turns:
        start = _encode(tokenizer, render_prompt(tokenizer, messages[:k], add_generation_prompt=True))
        end = input_ids if k == last else _encode(
            tokenizer, render_prompt(tokenizer, messages[: k + 1], add_generation_prompt=False)
        )
        if len(end) <= len(start) or end[: len(start)] != start or input_ids[: len(end)] != end:
            return None
        labels[len(start) : len(end)] = input_ids[len(start) : len(end)]
    return input_ids, labels


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    max_length: int | None = None,
    label_turns: str = "last",
) -> TokenizedExample:
    """Tokens of a conversation with labels on assistant tokens only (response-only loss).

    ``label_turns="last"`` labels the last assistant turn, ``"all"`` every assistant turn. The sequence
    ends with the last labelled turn: anything after it could not be learned from. Prompt tokens, and
    unlabelled assistant turns, get -100.
    """
    if label_turns not in ("last", "all"):
        raise ValueError(f"label_turns must be 'last' or 'all', got {label_turns!r}")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("no assistant turn to label")
    if label_turns == "last":
        turns = turns[-1:]
    by_prefix = _labels_by_prefix(tokenizer, messages, turns)
    if by_prefix is not None:
        return _finish(*by_prefix, max_length)
    # Fallback for templates that are not prefix-stable (e.g. ones that rewrite earlier turns, or whose
    # rendered text merges into different tokens at the prompt/response boundary): tokenize the prompt
    # and the response content separately and join them with EOS as the end of the turn. Earlier turns
    # cannot be located in such a rendering, so only the last turn can be labelled.
    if label_turns == "all":
        raise ValueError(
            "this chat template is not prefix-stable, so earlier assistant turns cannot be located in its "
            "rendering; use label_turns='last'"
        )
    k = turns[-1]
    prompt_ids = _encode(tokenizer, render_prompt(tokenizer, messages[:k], add_generation_prompt=True))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    response_ids = _encode(tokenizer, messages[k]["content"]) + eos
    return _finish(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, max_length)


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, max_length: int | None = None
) -> list[int]:
    """Tokens of the rendered prompt, ending with the generation prompt (what a model continues).

    ``max_length`` keeps the last tokens: the end of the prompt, with the generation prompt, is what
    the model must see to answer.
    """
    ids = _encode(tokenizer, render_prompt(tokenizer, messages, add_generation_prompt=True))
    return ids[-max_length:] if max_length is not None and len(ids) > max_length else ids


def _start_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """One unlabelled token to open a sequence that has no prompt: BOS, else EOS, else pad.

    The first token of a sequence has nothing to be predicted from, so text that began the sequence would
    go unscored on tokenizers without BOS (Qwen 2/2.5, GPT-2). There EOS is the document separator the
    model saw between pretraining documents, the nearest thing to a start token.
    """
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if token_id is not None:
            return [token_id]
    raise ValueError("the tokenizer has no BOS, EOS or pad token to start a sequence with")


def tokenize_text(
    tokenizer: PreTrainedTokenizerBase, text: str, *, max_length: int | None = None
) -> TokenizedExample:
    """Plain text with no prompt or template: a start token (``_start_ids``) + text + EOS, text and EOS labelled."""
    start = _start_ids(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    text_ids = _encode(tokenizer, text) + eos
    return _finish(start + text_ids, [IGNORE_INDEX] * len(start) + text_ids, max_length)


def tokenize_response_alone(tokenizer: PreTrainedTokenizerBase, example: TokenizedExample) -> TokenizedExample:
    """The labelled tokens of ``example`` without their prompt: a start token, then exactly those ids, labelled.

    IFD divides PPL(A | Q) by PPL(A), so both passes must score the same tokens. Tokenizing the response text
    again would not: it drops the template's end-of-turn tokens, adds EOS and may merge the first tokens
    differently. As in Cherry-LLM, the unconditional pass is the conditional pass's response ids.
    """
    response = [t for t in example.labels if t != IGNORE_INDEX]
    start = _start_ids(tokenizer)
    return _finish(start + response, [IGNORE_INDEX] * len(start) + response, None)
