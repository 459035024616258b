"""Kill a real `teacherfit generate` run with SIGKILL (several times), resume it, and check the result."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from teacherfit.data import load_records
from tiny import save_tiny, tiny_llama

N = 80


def _count_complete_lines(path):
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def _config(tmp_path, model_dir, out, worker="never", batch_size=1):
    instr = tmp_path / "instructions.jsonl"
    if not instr.exists():
        words = ["sea", "sky", "fox", "dog", "data", "code", "France", "colours", "poem", "network"]
        rows = [{"instruction": f"Write about the {words[i % 10]} number {i}."} for i in range(N)]
        instr.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "instructions": str(instr),
        "teachers": [{"name": "tiny", "model": str(model_dir), "batch_size": batch_size}],
        "decoding": {"max_new_tokens": 32},
        "worker_process": worker,
        "out": str(out),
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(cfg_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "teacherfit", "generate", "-c", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie waiting to be reaped)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("worker,batch_size", [("never", 1), ("always", 4)], ids=["in-process", "worker-process"])
def test_sigkill_and_resume_gives_exactly_one_row_each(tmp_path, tokenizer, worker, batch_size):
    """SIGKILL lands mid-chunk (4 prompts per chunk with a worker); with a worker process, the parent is killed and
    its worker must die with it (no orphan appending rows while the run resumes)."""
    model_dir = save_tiny(tiny_llama(tokenizer, seed=11), tokenizer, tmp_path / "model")
    out = tmp_path / "killed"
    cfg_path = _config(tmp_path, model_dir, out, worker, batch_size)
    partial = out / "responses" / "tiny.partial.jsonl"

    kills = 0
    for threshold in (4, 16, 30):  # kill three times, each time later in the run
        proc = _start(cfg_path)
        deadline = time.time() + 120
        while _count_complete_lines(partial) < threshold and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            output = proc.stdout.read().decode()
            workers = [int(w) for w in re.findall(r"generating in worker process (\d+)", output)]
            assert len(workers) == (worker == "always"), output
            for pid in workers:
                assert _gone(pid), f"worker {pid} outlived its killed parent"
    assert kills >= 2, "the run finished before it could be killed: make it longer"
    done_before = _count_complete_lines(partial)
    assert 0 < done_before < N

    proc = _start(cfg_path)
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())["teachers"][0]
    assert summary["resumed"] == done_before  # nothing generated twice ...
    assert summary["generated_now"] == N - done_before  # ... and no gaps

    rows = [json.loads(line) for line in (out / "responses" / "tiny.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    expected_ids = [r.id for r in load_records(tmp_path / "instructions.jsonl").records]
    assert ids == expected_ids  # exactly one complete row per instruction, in order
    assert all(r["messages"][-1]["role"] == "assistant" and "finish_reason" in r for r in rows)

    # the interrupted run produced the same responses as an uninterrupted one (greedy)
    ref_out = tmp_path / "reference"
    proc = _start(_config(tmp_path, model_dir, ref_out, worker, batch_size))
    assert proc.wait(timeout=300) == 0
    ref = {json.loads(l)["id"]: json.loads(l)["messages"][-1]["content"]
           for l in (ref_out / "responses" / "tiny.jsonl").read_text().splitlines()}
    assert {r["id"]: r["messages"][-1]["content"] for r in rows} == ref


def test_a_killed_worker_is_one_line_and_the_run_resumes(tmp_path, tokenizer):
    """The worker alone dies (the OOM killer, say): the parent reports it in one line, exit 2, and the next run
    finishes the set with the worker's rows kept."""
    model_dir = save_tiny(tiny_llama(tokenizer, seed=11), tokenizer, tmp_path / "model")
    out = tmp_path / "run"
    cfg_path = _config(tmp_path, model_dir, out, "always", 2)
    partial = out / "responses" / "tiny.partial.jsonl"
    proc = _start(cfg_path)
    worker, seen = None, b""
    deadline = time.time() + 120
    while worker is None and time.time() < deadline:
        seen += proc.stdout.readline()
        found = re.search(rb"generating in worker process (\d+)", seen)
        worker = int(found.group(1)) if found else None
    assert worker is not None, seen.decode()
    while _count_complete_lines(partial) < 6 and time.time() < deadline:
        time.sleep(0.005)
    os.kill(worker, signal.SIGKILL)
    output = (seen + proc.communicate(timeout=120)[0]).decode()
    assert proc.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "worker process" in errors[0] and "run the same command again" in errors[0], output
    assert "Traceback" not in output
    kept = _count_complete_lines(partial)
    assert 6 <= kept < N

    proc = _start(cfg_path)
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())["teachers"][0]
    assert (summary["resumed"], summary["generated_now"]) == (kept, N - kept)
    ids = [json.loads(line)["id"] for line in (out / "responses" / "tiny.jsonl").read_text().splitlines()]
    assert ids == [r.id for r in load_records(tmp_path / "instructions.jsonl").records]
