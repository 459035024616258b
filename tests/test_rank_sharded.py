"""rank launched as several processes (torchrun, gloo, CPU): the rows of each stage are split between the
processes, each scores its share into its own shard, the main process merges them and alone writes the run's
outputs; the result is a one-process run's, score for score. Tiny real models (tests/tiny.py)."""

import json
import os
import re
import socket
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from teacherfit.config import RankConfig, finish_runs, load_config
from teacherfit.data import Record, write_records
from teacherfit.pipelines import rank
from teacherfit.pipelines.rank import run_rank
from test_rank_resume import ANSWERS, QUESTIONS  # the same response sets as the 1-process resume tests
from tiny import save_tiny, tiny_llama, tiny_qwen2, tiny_reward_model

N_ROWS = 15  # 3 teachers x 5 instructions
STAGES = {"student": "student", "ref": "reference LM", "reward": "reward", "grace": "GRACE gradients"}
SCORES = ("reward", "loss_student", "loss_student_uncond", "loss_ref", "loss_ref_uncond", "car", "ppl_student",
          "ifd_student", "ppl_ref", "ifd_ref", "length")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer):
    """Models, response sets, and a one-process run of them (in this process) to compare with."""
    root = tmp_path_factory.mktemp("rank_sharded")
    student = save_tiny(tiny_llama(tokenizer, seed=4), tokenizer, root / "student")
    ref = save_tiny(tiny_qwen2(tokenizer, seed=6), tokenizer, root / "ref")
    rm = save_tiny(tiny_reward_model(tokenizer), tokenizer, root / "rm")
    sets = {}
    for name, answers in ANSWERS.items():
        sets[name] = write_records(root / f"{name}.jsonl", [
            Record.from_messages([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in zip(QUESTIONS, answers)])
    base = {"student": str(student), "reference_lm": str(ref),
            "reward": {"kind": "classifier", "model": str(rm)}, "bootstrap": 0, "models": {"device": "cpu"},
            "responses": [{"name": n, "path": str(p)} for n, p in sets.items()]}
    ws = {"root": root, "base": base}
    ranked(ws, root / "single")
    return ws


def config(ws, out, **extra) -> tuple[RankConfig, "os.PathLike"]:
    data = {**ws["base"], **extra, "out": str(out)}
    path = ws["root"] / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(RankConfig, path, []), path


def ranked(ws, out, **extra):
    try:
        return run_rank(config(ws, out, **extra)[0])
    finally:
        finish_runs()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cfg_path) -> str:
    """`teacherfit rank` as two torchrun processes (gloo on the CPU); returns their output."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "teacherfit", "rank", "-c", str(cfg_path)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return " ".join(output.split())


def per_sample(run_dir) -> dict:
    return {(r["teacher"], r["id"]): r for r in pq.read_table(run_dir / "per_sample.parquet").to_pylist()}


def assert_same_run(run_dir, single):
    got, want = per_sample(run_dir), per_sample(single)
    assert got.keys() == want.keys() and len(got) == N_ROWS
    for key, row in want.items():
        for field in SCORES:
            assert got[key][field] == pytest.approx(row[field], rel=1e-6, abs=1e-6), (key, field)
    a, b = (json.loads((d / "teachers.json").read_text()) for d in (run_dir, single))
    assert [t["teacher"] for t in a] == [t["teacher"] for t in b]
    assert [t["car"] for t in a] == pytest.approx([t["car"] for t in b], rel=1e-6)
    assert [t["grape"] for t in a] == [t["grape"] for t in b]
    assert [t["grace"] for t in a] == pytest.approx([t["grace"] for t in b], rel=1e-4)  # the gradients of shards
    # each output once, no file of a process left over, every stage's file whole and without duplicates
    assert {p.name for p in run_dir.iterdir()} == {p.name for p in single.iterdir()}
    scores = sorted(p.name for p in (run_dir / "scores").iterdir())
    assert scores == sorted(p.name for p in (single / "scores").iterdir()) and len(scores) == 8, scores
    for path in (run_dir / "scores").glob("*.jsonl"):
        keys = [(r["teacher"], r["id"], r["content"]) for r in map(json.loads, path.read_text().splitlines())]
        assert len(keys) == len(set(keys)) == N_ROWS, path.name


def shares(output: str) -> dict:
    """{(process, stage label): (its rows, rows to score)} from the processes' lines."""
    found = re.findall(r"process (\d) of 2: (student|reference LM|reward|GRACE gradients): (\d+) of (\d+) rows to score", output)
    return {(int(p), stage): (int(mine), int(todo)) for p, stage, mine, todo in found}


def test_two_processes_split_the_rows_and_rank_as_one(ws):
    single = ws["root"] / "single"
    run_dir = ws["root"] / "two"
    output = torchrun(config(ws, run_dir)[1])
    # each process scored its own half of every stage's rows
    assert shares(output) == {(p, label): (8 - p, N_ROWS) for p in (0, 1) for label in STAGES.values()}
    assert output.count("report: ") == 1 and output.count("teachers for ") == 1  # one process reports
    assert_same_run(run_dir, single)


def test_a_killed_sharded_run_resumes_from_its_shards(ws):
    """The scores a killed two-process run left: some merged, some only in the processes' shards (one shard
    from a three-process launch, with a torn last line and a stale copy of a merged row). Nothing there is
    scored again; the stale copy loses to the merged row; the shards are merged and removed."""
    single = ws["root"] / "single"
    run_dir = ws["root"] / "resumed"
    (run_dir / "scores").mkdir(parents=True)
    for path in (single / "scores").glob("*.jsonl"):
        lines = path.read_text().splitlines(keepends=True)
        stale = json.loads(lines[0])
        stale.update({k: -1.0 for k in ("loss", "loss_uncond", "reward") if k in stale})
        stale.update({"grad": [-1.0] * len(stale["grad"])} if "grad" in stale else {})
        (run_dir / "scores" / path.name).write_text("".join(lines[:4]))
        rank.shard_path(run_dir / "scores" / path.name, 0).write_text("".join(lines[4:7]))
        rank.shard_path(run_dir / "scores" / path.name, 2).write_text(
            "".join(lines[7:9]) + json.dumps(stale) + "\n" + lines[9][: len(lines[9]) // 2])
    output = torchrun(config(ws, run_dir)[1])
    # 9 rows were scored before the kill: the 6 left are split 3 / 3
    assert shares(output) == {(p, label): (3, 6) for p in (0, 1) for label in STAGES.values()}
    assert_same_run(run_dir, single)


def test_one_process_takes_the_rows_of_a_sharded_run(ws, monkeypatch):
    """A killed sharded run resumed by a single process: its shards' rows are merged, not scored again."""
    single = ws["root"] / "single"
    run_dir = ws["root"] / "one-after-two"
    (run_dir / "scores").mkdir(parents=True)
    for path in (single / "scores").glob("*.jsonl"):
        lines = path.read_text().splitlines(keepends=True)
        rank.shard_path(run_dir / "scores" / path.name, 0).write_text("".join(lines[0:N_ROWS:2]))
        rank.shard_path(run_dir / "scores" / path.name, 1).write_text("".join(lines[1:N_ROWS - 2:2]))
    scored = []
    real = rank.ResumableJsonl.append

    def count(self, row):
        scored.append(self.path.name.split("-")[0])
        return real(self, row)

    monkeypatch.setattr(rank.ResumableJsonl, "append", count)
    ranked(ws, run_dir)
    assert sorted(scored) == ["grace", "ref", "reward", "student"]  # per stage, only the row no shard held
    assert_same_run(run_dir, single)


def test_merge_keeps_the_scores_file_row_of_a_key_and_removes_the_shards(tmp_path):
    path = tmp_path / "student-0123.jsonl"
    path.write_text(json.dumps({"teacher": "a", "id": "1", "content": "x", "loss": 1.0}) + "\n")
    rank.shard_path(path, 0).write_text(json.dumps({"teacher": "a", "id": "1", "content": "x", "loss": 9.0}) + "\n"
                                        + json.dumps({"teacher": "a", "id": "2", "content": "y", "loss": 2.0}) + "\n")
    rank.shard_path(path, 1).write_text(json.dumps({"teacher": "a", "id": "2", "content": "y", "loss": 8.0}) + "\n"
                                        + '{"teacher": "a", "id": "3", "con')  # torn by a kill
    assert rank.merge_shards(path) == 1
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [1.0, 2.0]
    assert rank.shard_paths(path) == []
    assert rank.merge_shards(path) == 0


def test_reward_device_map_is_refused_with_several_processes(ws, tmp_path):
    """Both processes of a two-process launch (the environment torchrun gives them) stop at once with one line."""
    path = config(ws, tmp_path / "refused", reward={**ws["base"]["reward"], "device_map": "auto"})[1]
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "teacherfit", "rank", "-c", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (0, 1)]
    for proc in procs:
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 2, output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in output, output
        assert "reward.device_map='auto'" in errors[0] and "2 processes" in errors[0]
    assert not (tmp_path / "refused").exists()


def test_reward_device_map_auto_in_one_process_scores_the_same(ws):
    run_dir = ws["root"] / "device-map"
    result = ranked(ws, run_dir, reward={**ws["base"]["reward"], "device_map": "auto"})
    assert result.results["reward"]["device_map"] == ["cpu"]
    assert_same_run(run_dir, ws["root"] / "single")
