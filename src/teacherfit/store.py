"""Atomic and resumable outputs (data layer).

Long runs (generation, scoring) write one row the moment it exists, so that a run killed at any instant
(SIGKILL, OOM, a pre-empted node) loses at most the row being written and restarts where it stopped.
Whole files (configs, reports, datasets) are written atomically: readers see the old file or the new one,
never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _fsync_dir(directory: Path) -> None:
    """Make a rename or a new file entry in ``directory`` durable (not only its data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the complete new one.

    The bytes go to a temporary file in the same directory (``os.replace`` is atomic only within a file
    system), are fsynced, then renamed over ``path``. The temporary file is removed if anything fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON (non-ASCII kept readable), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def cached_json(path: str | os.PathLike, compute) -> Any:
    """``compute()``, stored atomically as JSON at ``path`` the first time and read back after (a finished stage)."""
    path = Path(path)
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    atomic_write_json(path, value)
    return value


def flatten(value: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: nested mappings as dotted keys (provenance tables, tracker configs)."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(flatten(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def sha256_json(value: Any) -> str:
    """sha256 hex digest of ``value``'s canonical JSON (sorted keys, no whitespace): a digest of settings."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _key_part(value: Any) -> Any:
    """A hashable, comparable form of one key field: dicts and lists are compared by their JSON."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return value


class ResumableJsonl:
    """Append-only JSONL of finished rows, keyed by a tuple of fields; survives SIGKILL at any instant.

    Each row is one ``os.write`` of a whole line on a file opened with ``O_APPEND``, followed by
    ``os.fsync``: a kill can only leave a torn *last* line, which is cut away the next time the file is
    opened (its byte count is kept in ``repaired_bytes``). A damaged line anywhere else is not a torn
    write but corruption, and raises instead of being dropped silently. One writer per file.
    """

    def __init__(self, path: str | os.PathLike, key_fields: tuple[str, ...] = ("id",)):
        if not key_fields:
            raise ValueError("key_fields must name at least one field")
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self.repaired_bytes = 0
        self._done: set[tuple] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        if existed:
            self._load_and_repair()
        self._fd = os.open(self.path, os.O_APPEND | os.O_CREAT | os.O_WRONLY, 0o644)
        if not existed:
            _fsync_dir(self.path.parent)

    def _load_and_repair(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # Everything after the last newline is a line whose write never completed.
        complete, good_len = lines[:-1], len(data) - len(lines[-1])
        for number, raw in enumerate(complete, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if number == len(complete):
                    # An unparsable last line can only be the remains of an interrupted write (an
                    # acknowledged append was fsynced whole), so it is cut like a line with no newline.
                    good_len -= len(raw) + 1
                    break
                raise ValueError(f"{self.path}:{number}: corrupt row in resumable file ({exc})") from exc
            try:  # a whole row without its key fields is not a torn write: never cut it
                key = self.key_of(row)
            except ValueError as exc:
                raise ValueError(f"{self.path}:{number}: {exc}: written by another version or another "
                                 "command; move the file away to start this part over") from None
            self._done.add(key)
        if good_len < len(data):
            self.repaired_bytes = len(data) - good_len
            os.truncate(self.path, good_len)

    def key_of(self, row: dict) -> tuple:
        """The key of ``row``: its ``key_fields`` values, nested values compared by their JSON."""
        missing = [f for f in self.key_fields if f not in row]
        if missing:
            raise ValueError(f"row has no key field(s) {missing}; key fields are {list(self.key_fields)}")
        return tuple(_key_part(row[f]) for f in self.key_fields)

    def done_keys(self) -> set[tuple]:
        """Keys of the complete rows on disk."""
        return set(self._done)

    def append(self, row: dict) -> None:
        """Write ``row`` as one line and fsync it; a key that is already done is refused."""
        key = self.key_of(row)
        if key in self._done:
            raise ValueError(f"{self.path}: key {key} is already done; refusing to write it twice")
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        while written < len(line):  # short writes are rare on regular files; finish the line if one happens
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)
        self._done.add(key)

    def rows(self) -> list[dict]:
        """All complete rows, in the order they were written (read back from disk, the record of truth)."""
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def __len__(self) -> int:
        return len(self._done)

    def finalize(self, out_path: str | os.PathLike, order: list[tuple] | None = None, where=None) -> Path:
        """Write every row (or those for which ``where(row)`` is true) to ``out_path`` (JSONL) atomically and
        return that path.

        With ``order`` (a list of keys) rows come in that order; rows whose key is not in ``order`` follow,
        in the order they were written, so that nothing finished is ever lost.
        """
        rows = [row for row in self.rows() if where is None or where(row)]
        if order is not None:
            rank = {tuple(_key_part(v) for v in key): i for i, key in enumerate(order)}
            rows.sort(key=lambda row: rank.get(self.key_of(row), len(rank)))  # stable: unranked keep order
        out_path = Path(out_path)
        atomic_write_text(out_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return out_path

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResumableJsonl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
