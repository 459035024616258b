import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from teacherfit.store import ResumableJsonl, atomic_write_bytes, atomic_write_json, atomic_write_text

SRC = str(Path(__file__).parents[1] / "src")


def lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_rows_are_kept_across_reopen(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    with ResumableJsonl(path) as store:
        for i in range(3):
            store.append({"id": f"r{i}", "text": f"réponse {i}"})
        assert len(store) == 3
    with ResumableJsonl(path) as store:
        assert store.done_keys() == {("r0",), ("r1",), ("r2",)}
        assert store.rows() == [{"id": f"r{i}", "text": f"réponse {i}"} for i in range(3)]
        assert store.repaired_bytes == 0


@pytest.mark.parametrize("torn", [b'{"id": "r3", "text": "half a ro', b'{"id": "r3", "te\x00\x00\n'])
def test_torn_last_line_is_cut_on_open(tmp_path, torn):
    path = tmp_path / "rows.jsonl"
    with ResumableJsonl(path) as store:
        for i in range(3):
            store.append({"id": f"r{i}"})
    intact = path.read_bytes()
    with open(path, "ab") as f:  # what a kill in the middle of a write leaves behind
        f.write(torn)

    with ResumableJsonl(path) as store:
        assert store.repaired_bytes == len(torn)
        assert path.read_bytes() == intact
        assert store.done_keys() == {("r0",), ("r1",), ("r2",)}
        store.append({"id": "r3", "text": "whole"})
    assert lines(path) == [{"id": "r0"}, {"id": "r1"}, {"id": "r2"}, {"id": "r3", "text": "whole"}]


def test_corrupt_line_before_the_last_raises(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: corrupt row"):
        ResumableJsonl(path)
    assert path.read_text() == '{"id": "a"}\nnot json\n{"id": "b"}\n'  # nothing cut


def test_a_whole_row_without_its_key_is_never_cut(tmp_path):
    """Only a line that is not JSON can be a torn write; a complete row of another layout (an older version's
    file) is refused with its line, even as the only or last line, instead of being dropped silently."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a", "text": "kept"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1: row has no key field\(s\) \['settings'\]"):
        ResumableJsonl(path, key_fields=("id", "settings"))
    assert path.read_text() == '{"id": "a", "text": "kept"}\n'


def test_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    with ResumableJsonl(path) as store:
        store.append({"id": "a", "v": 1})
        with pytest.raises(ValueError, match="already done"):
            store.append({"id": "a", "v": 2})
        with pytest.raises(ValueError, match="no key field"):
            store.append({"v": 3})
    with ResumableJsonl(path) as store:
        with pytest.raises(ValueError, match="already done"):
            store.append({"id": "a", "v": 2})
    assert lines(path) == [{"id": "a", "v": 1}]


def test_composite_keys_compare_nested_values_by_json(tmp_path):
    with ResumableJsonl(tmp_path / "rows.jsonl", key_fields=("id", "decoding")) as store:
        store.append({"id": "a", "decoding": {"temperature": 0.0, "seed": 1}})
        store.append({"id": "a", "decoding": {"temperature": 0.7, "seed": 1}})
        with pytest.raises(ValueError, match="already done"):
            store.append({"id": "a", "decoding": {"seed": 1, "temperature": 0.0}})  # same dict, other key order
        assert ("a", '{"seed":1,"temperature":0.0}') in store.done_keys()
        assert len(store) == 2


def test_finalize_orders_rows_and_keeps_unlisted_ones(tmp_path):
    with ResumableJsonl(tmp_path / "work.jsonl") as store:
        for key in ("c", "a", "d", "b"):  # the order rows finished in
            store.append({"id": key})
        out = store.finalize(tmp_path / "final.jsonl", order=[("a",), ("b",), ("c",)])
    assert out == tmp_path / "final.jsonl"
    assert [row["id"] for row in lines(out)] == ["a", "b", "c", "d"]
    with ResumableJsonl(tmp_path / "work.jsonl") as store:
        assert [row["id"] for row in lines(store.finalize(tmp_path / "as_written.jsonl"))] == ["c", "a", "d", "b"]


WRITER = """
import sys
from teacherfit.store import ResumableJsonl
store = ResumableJsonl(sys.argv[1])
i = len(store)
print("ready", flush=True)
while True:
    store.append({"id": i, "text": "x" * 2000})
    i += 1
"""


def test_survives_sigkill_while_writing(tmp_path):
    path = tmp_path / "rows.jsonl"
    for _ in range(2):  # kill it, resume, kill it again
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": SRC},
        )
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with ResumableJsonl(path) as store:
        n = len(store)
        assert n > 0
        assert store.done_keys() == {(i,) for i in range(n)}  # consecutive: no row lost or repeated
        assert [row["id"] for row in store.rows()] == list(range(n))


def test_atomic_writes_replace_whole_files_and_leave_no_temp(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_json(target, {"name": "café", "n": [1, 2]})
    assert target.read_text(encoding="utf-8") == '{\n  "name": "café",\n  "n": [\n    1,\n    2\n  ]\n}\n'
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(tmp_path / "blob.bin", b"\x00\x01")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["blob.bin", "report.json", "sub"]


def test_failed_atomic_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
