"""cache-teacher launched as several processes (torchrun, gloo, CPU): the examples still to cache are split
between the processes, each writes its share into its part of the folder, the main process lists the parts'
shards in the one index; the cache is a one-process run's, row for row, and every example is in it once, also
when the run resumes one that was cut short (by one process or several). Tiny real models (tests/tiny.py)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from test_cache import CHATS, shard_keys, sharpened
from test_rank_sharded import free_port
from tiny import save_tiny, tiny_qwen2

from teacherfit.config import CacheTeacherConfig, finish_runs, load_config
from teacherfit.distill.cache import (
    CACHE_FORMAT,
    CacheError,
    TopKCache,
    TopKCacheWriter,
)
from teacherfit.pipelines.cache_teacher import merge_parts, part_dir, run_cache_teacher

MORE_CHATS = [
    ("Name a prime number.", "Seven is a prime number."),
    ("Say hello in Spanish.", "Hola."),
    ("Sort [3, 1, 2].", "[1, 2, 3]"),
    ("Why is the sky blue? Explain briefly in one sentence.",
     "Sunlight scatters off air molecules, and blue light scatters the most, so the sky looks blue."),
]
N = len(CHATS) + len(MORE_CHATS)  # 9 examples, 2 per shard: 5 shards in a one-process run


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer):
    """A teacher, the responses, and a one-process cache of them (in this process) to compare with."""
    root = tmp_path_factory.mktemp("cache_sharded")
    teacher = save_tiny(sharpened(tiny_qwen2(tokenizer, seed=11)), tokenizer, root / "teacher")
    responses = root / "responses.jsonl"
    responses.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in CHATS + MORE_CHATS))
    base = {"teacher": str(teacher), "data": {"responses": [{"name": "t", "path": str(responses)}]}, "top_k": 8,
            "max_length": 64, "max_tokens": 64, "examples_per_shard": 2, "models": {"device": "cpu"}}
    ws = {"root": root, "base": base}
    assert cached(ws, root / "single")["shards"] == 5
    return ws


def config(ws, out, **extra) -> tuple[CacheTeacherConfig, "os.PathLike"]:
    data = {**ws["base"], **extra, "out": str(out)}
    path = ws["root"] / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(CacheTeacherConfig, path, []), path


def cached(ws, out, **extra) -> dict:
    try:
        return run_cache_teacher(config(ws, out, **extra)[0])
    finally:
        finish_runs()


def torchrun(cfg_path) -> str:
    """`teacherfit cache-teacher` as two torchrun processes (gloo on the CPU); returns their output."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "teacherfit", "cache-teacher", "-c", str(cfg_path)],
                          check=False, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return " ".join(output.split())


def shares(output: str) -> dict:
    """{process: (its examples, examples to cache)} from the processes' lines."""
    found = re.findall(r"process (\d) of 2: (\d+) of (\d+) examples to cache", output)
    return {int(p): (int(mine), int(todo)) for p, mine, todo in found}


def assert_same_cache(folder, single):
    """The same examples as the one-process cache, each listed once, with the same rows; summary's counts global."""
    want, got = TopKCache(single), TopKCache(folder)  # the reader refuses an example in two shards
    assert got.meta == want.meta and sorted(got.keys()) == sorted(want.keys()) and len(got) == N
    counts = shard_keys(folder)
    assert sorted(counts) == sorted(want.keys()) and set(counts.values()) == {1}
    files = [s["file"] for s in json.loads((folder / "index.json").read_text())["shards"]]
    assert len(files) == len(set(files))
    for key in sorted(want.keys()):
        (ids_a, lps_a), (ids_b, lps_b) = want.get(key), got.get(key)
        assert torch.equal(ids_b, ids_a), key  # the top ids and the tail draws (seeded by the example key)
        torch.testing.assert_close(lps_b, lps_a, rtol=0, atol=1e-6)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["examples"] == N and summary["tokens"] == want.tokens == got.tokens
    return summary


def test_two_processes_split_the_examples_and_cache_as_one(ws):
    single, run_dir = ws["root"] / "single", ws["root"] / "two"
    output = torchrun(config(ws, run_dir)[1])
    assert shares(output) == {0: (5, N), 1: (4, N)} and "resuming" not in output
    summary = assert_same_cache(run_dir, single)
    assert summary["processes"] == 2 and summary["examples_now"] == N and summary["resumed"] == 0
    assert summary["tokens_now"] == summary["tokens"]
    # the one index and summary, the shards in the processes' parts, every one of them listed
    assert {p.name for p in run_dir.iterdir()} == {p.name for p in single.iterdir() if not p.name.startswith("shard-")} | {"parts"}
    assert sorted(p.name for p in (run_dir / "parts").iterdir()) == ["rank-0", "rank-1"]
    on_disk = {str(p.relative_to(run_dir)) for p in run_dir.glob("parts/*/shard-*")}
    assert on_disk == {s["file"] for s in json.loads((run_dir / "index.json").read_text())["shards"]}
    assert not list(run_dir.rglob(".*.tmp"))


def test_two_processes_resume_a_partial_run_caching_each_example_once(ws):
    """A one-process run cached the first 4 examples (data.limit); two processes cache the other 5, nothing twice."""
    single, run_dir = ws["root"] / "single", ws["root"] / "after-one"
    assert cached(ws, run_dir, data={**ws["base"]["data"], "limit": 4})["examples"] == 4
    output = torchrun(config(ws, run_dir)[1])
    assert "resuming, 4 examples already cached, 5 to go" in output
    assert shares(output) == {0: (3, 5), 1: (2, 5)}
    summary = assert_same_cache(run_dir, single)
    assert summary["resumed"] == 4 and summary["examples_now"] == 5 and summary["processes"] == 2


def meta_kwargs(meta: dict, per_shard: int = 2) -> dict:
    """The writer arguments that give ``meta``."""
    return {"top_k": meta["k"], "tail_samples": meta["tail_samples"], "teacher_provenance": meta["teacher"],
            "tokenizer_digest": meta["tokenizer_digest"], "max_length": meta["max_length"],
            "examples_per_shard": per_shard, "vocab_rows": meta["vocab_rows"]}


def place(single, folder, number: int, name: str) -> None:
    """Copy shard ``number`` of the one-process cache into ``folder`` as ``name``, listed in ``folder``'s index."""
    index = json.loads((single / "index.json").read_text())
    entry = dict(index["shards"][number], file=name)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(single / index["shards"][number]["file"], folder / name)
    path = folder / "index.json"
    shards = json.loads(path.read_text())["shards"] if path.exists() else []
    path.write_text(json.dumps({"format": CACHE_FORMAT, "meta": index["meta"], "shards": shards + [entry]}))


def killed_sharded_run(single, run_dir) -> list[str]:
    """What killed runs left: 2 examples listed in the index (a one-process run), 2 + 2 + 1 in the parts of a
    two- and a four-process run, not merged yet; and an unlisted shard (written, not listed: killed between the
    two writes) holding wrong rows for the 2 examples left. Returns those 2 examples' keys."""
    place(single, run_dir, 0, "shard-00000.safetensors")
    place(single, part_dir(run_dir, 0), 1, "shard-00000.safetensors")
    place(single, part_dir(run_dir, 1), 2, "shard-00000.safetensors")
    place(single, part_dir(run_dir, 3), 4, "shard-00000.safetensors")
    cache = TopKCache(single)
    index = json.loads((single / "index.json").read_text())
    placed = set(TopKCache(run_dir).keys()).union(*(TopKCache(part_dir(run_dir, r)).keys() for r in (0, 1, 3)))
    left = sorted(set(cache.keys()) - placed)
    wrong = run_dir / "wrong"
    with TopKCacheWriter(wrong, **meta_kwargs(index["meta"], per_shard=10)) as writer:
        for key in left:
            ids, lps = cache.get(key)
            writer.add(key, torch.zeros_like(ids), torch.full_like(lps, -2.0))
    shutil.move(wrong / "shard-00000.safetensors", part_dir(run_dir, 1) / "shard-00001.safetensors")
    shutil.rmtree(wrong)
    return left


@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_sharded_run_resumes_from_its_parts(ws, processes):
    """The parts' listed shards count as cached (whatever the number of processes now), the unlisted one does not:
    its 2 examples are computed again, and every example ends up listed once with the one-process rows."""
    single, run_dir = ws["root"] / "single", ws["root"] / f"killed-{processes}"
    left = killed_sharded_run(single, run_dir)
    assert len(left) == 2
    if processes == 1:
        summary = cached(ws, run_dir)
    else:
        output = torchrun(config(ws, run_dir)[1])
        assert "resuming, 7 examples already cached, 2 to go" in output
        assert shares(output) == {0: (1, 2), 1: (1, 2)}
        summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] == 7 and summary["examples_now"] == 2 and summary["processes"] == processes
    assert_same_cache(run_dir, single)
    if processes == 2:  # process 1 numbered its shard after its listed one: the unlisted file was overwritten
        assert "parts/rank-1/shard-00001.safetensors" in {s["file"] for s in
                                                          json.loads((run_dir / "index.json").read_text())["shards"]}
    # a finished cache: nothing to do, nothing added
    again = cached(ws, run_dir)
    assert again["examples_now"] == 0 and again["examples"] == N and again["shards"] == summary["shards"]


def test_merge_lists_the_parts_once_and_refuses_damage(ws, tmp_path):
    single = ws["root"] / "single"
    meta = json.loads((single / "index.json").read_text())["meta"]
    kwargs = meta_kwargs(meta)
    place(single, tmp_path / "a", 0, "shard-00000.safetensors")
    place(single, part_dir(tmp_path / "a", 2), 1, "shard-00000.safetensors")
    assert merge_parts(tmp_path / "a", kwargs) == 1
    assert merge_parts(tmp_path / "a", kwargs) == 0  # idempotent
    assert len(TopKCache(tmp_path / "a")) == 4
    # a part that holds an example the cache lists already (two runs writing one folder): refused, index unchanged
    place(single, part_dir(tmp_path / "a", 5), 0, "shard-00000.safetensors")
    before = (tmp_path / "a" / "index.json").read_text()
    with pytest.raises(CacheError, match="holds already"):
        merge_parts(tmp_path / "a", kwargs)
    assert (tmp_path / "a" / "index.json").read_text() == before
    # a part made with other settings
    place(single, part_dir(tmp_path / "b", 0), 1, "shard-00000.safetensors")
    with pytest.raises(CacheError, match="other settings"):
        merge_parts(tmp_path / "b", {**kwargs, "max_length": 128})
    # no part, no index yet: an empty cache's index
    assert merge_parts(tmp_path / "c", kwargs) == 0 and len(TopKCache(tmp_path / "c")) == 0
