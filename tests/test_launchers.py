"""The training runtime under each launcher, on CPU processes (gloo), through the shipped accelerate configs.

What each test proves is read from the run itself: ``summary.json``'s ``distribution`` is measured inside the
processes (the launch, accelerate's distributed type, the share of the student's parameters this process holds,
whether the teacher is sharded), so a launch that silently fell back to plain DDP fails here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from teacherfit.data import Record, write_records
from test_rank_sharded import free_port
from tiny import save_tiny, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
QA = [("Write a short poem about the sea.", "The sea is blue and wide, the sky is grey.", False),
      ("List three colours.", "red, green and blue", False),
      ("What is the capital of France?", "Paris is the capital of France.", False),
      ("Explain how a neural network learns.", "It computes a loss, then gradients, then updates.", False),
      ("def add(a, b):", "    return a + b", True),
      ("def sub(a, b):", "    return a - b", True),
      ("Write a Python function that multiplies.", "def mul(a, b):\n    return a * b\n", True),
      ("Name a fox.", "The quick brown fox.", False)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("launchers")
    recs = [Record.from_messages([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                 meta={"domain": d}) for q, a, d in QA]
    return {"root": root, "data": write_records(root / "train.jsonl", recs),
            "teacher": save_tiny(tiny_llama(tokenizer, seed=41, layers=4), tokenizer, root / "teacher"),
            "student": save_tiny(tiny_llama(tokenizer, seed=42, layers=2), tokenizer, root / "student")}


def _write(tmp_path: Path, name: str, cfg: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "out": str(tmp_path / name)}))
    return path


def _distill(ws, **train) -> dict:
    return {"student": str(ws["student"]), "teacher": str(ws["teacher"]), "models": {"device": "cpu"},
            "data": {"responses": [{"name": "t", "path": str(ws["data"])}]}, "kd": {"lambda": 0.6, "w_attn": 0.5},
            "train": {"batch_size": 2, "max_steps": 3, "warmup_steps": 1, "lr": 1e-3, "epochs": 2, **train}}


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    return proc


def accelerate_launch(config: Path, command: str, cfg_path: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` with a shipped config, as a user types it, on 2 CPU processes."""
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                 "--num_processes", "2", "--main_process_port", str(free_port()),
                 "-m", "teacherfit", command, "-c", str(cfg_path)])


def single_and_launched(ws, tmp_path: Path, config: str, single: dict, launched: dict) -> tuple[list, list, dict]:
    """One process with ``single``'s train settings, then 2 processes under ``configs/accelerate/<config>`` with
    ``launched``'s; returns both logs and the launched run's measured distribution."""
    one = _run([sys.executable, "-m", "teacherfit", "distill", "-c", str(_write(tmp_path, "single", single))])
    assert one.returncode == 0, one.stdout + one.stderr
    two = accelerate_launch(CONFIGS / config, "distill", _write(tmp_path, "launched", launched))
    assert two.returncode == 0, two.stdout + two.stderr
    dist = json.loads((tmp_path / "launched" / "summary.json").read_text())["distribution"]
    return _log(tmp_path / "single"), _log(tmp_path / "launched"), dist


def assert_same_run(a: list[dict], b: list[dict], keys=("loss", "ce", "kd", "attn", "grad_norm", "lr", "tokens")):
    assert [r["step"] for r in b] == [r["step"] for r in a] and a
    for ra, rb in zip(a, b):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-9), (ra["step"], key)


def assert_same_weights(dir_a: Path, dir_b: Path) -> None:
    ma, mb = AutoModelForCausalLM.from_pretrained(dir_a), AutoModelForCausalLM.from_pretrained(dir_b)
    for (name, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert pa.shape == pb.shape and torch.allclose(pa, pb, atol=1e-5), name


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fsdp2_two_processes_equal_one_process_with_the_student_and_teacher_sharded(ws, tmp_path):
    """configs/accelerate/fsdp.yaml on 2 CPU processes = 1 process with twice the accumulation: every log value
    (losses, attention KD through the sharded teacher, gradient norm, lr) and the saved weights, to 1e-5.
    8 examples, 1 per micro-batch, 3 micro-batches per process per step: steps of 6, 2 (an epoch's short end) and
    6 micro-batches, so gradient sync is held back within a step and the short step is shared evenly."""
    a, b, dist = single_and_launched(ws, tmp_path, "fsdp.yaml", _distill(ws, batch_size=1, grad_accum=6),
                                     _distill(ws, batch_size=1, grad_accum=3))
    # the student really is split (each process holds half of every parameter) and so is the frozen teacher
    assert dist == {"launch": "fsdp2", "type": "FSDP", "processes": 2, "student_share": 0.5, "teacher_sharded": True}
    assert json.loads((tmp_path / "single" / "summary.json").read_text())["distribution"]["student_share"] == 1.0
    assert [r["step"] for r in b] == [1, 2, 3]
    assert_same_run(a, b)
    assert b[-1]["attn"] > 0 and b[-1]["kd"] > 0
    assert_same_weights(tmp_path / "single" / "model", tmp_path / "launched" / "model")  # gathered: no placeholders
    mb = AutoModelForCausalLM.from_pretrained(tmp_path / "launched" / "model")
    student = AutoModelForCausalLM.from_pretrained(ws["student"])
    assert any(not torch.allclose(p, q) for p, q in zip(student.state_dict().values(), mb.state_dict().values()))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    torch.testing.assert_close(_logits(tmp_path / "launched" / "model", ids),
                               _logits(tmp_path / "single" / "model", ids), rtol=1e-5, atol=1e-5)
    # the sharded checkpoint (each process its shard) is complete and a re-run resumes from it, training nothing
    ckpt = tmp_path / "launched" / "checkpoints" / "step-0000003"
    assert (ckpt / "state.json").exists() and (ckpt / "pytorch_model_fsdp_0").is_dir()
    again = accelerate_launch(CONFIGS / "fsdp.yaml", "distill", tmp_path / "launched.yaml")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from step-0000003" in again.stdout + again.stderr and _log(tmp_path / "launched") == b


def test_ddp_config_two_processes_equal_one_process(ws, tmp_path):
    """configs/accelerate/ddp.yaml on 2 CPU processes: same losses, lr schedule (stepped once per optimizer step,
    not once per process) and weights as 1 process with the same global batch."""
    a, b, dist = single_and_launched(ws, tmp_path, "ddp.yaml", _distill(ws, grad_accum=2, warmup_steps=0),
                                     _distill(ws, grad_accum=1, warmup_steps=0))
    assert dist["launch"] == "ddp" and dist["type"] == "MULTI_CPU" and dist["processes"] == 2
    assert dist["student_share"] == 1.0 and not dist["teacher_sharded"]
    assert a[1]["lr"] < a[0]["lr"]  # the schedule moves, and the same way (lr compared below)
    assert_same_run(a, b)
    ids = torch.tensor([[2, 4, 6, 8, 10]])
    torch.testing.assert_close(_logits(tmp_path / "launched" / "model", ids),
                               _logits(tmp_path / "single" / "model", ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_equal_one_process(ws, tmp_path, stage):
    """configs/accelerate/deepspeed_zero{2,3}.yaml on 2 CPU processes (DeepSpeed's CPU accelerator, gloo): the
    log and the saved weights equal one process's. ZeRO-3 partitions the student and the teacher (each process
    holds half) and the saved model is gathered whole."""
    pytest.importorskip("deepspeed")
    single_cfg = _distill(ws, batch_size=1, grad_accum=6)  # steps of 6, 2 and 6 micro-batches, as for FSDP2
    if stage == 3:  # a partitioned head takes the checkpointed head path: the reference takes it too
        single_cfg["kd"]["fused_head"] = False
    a, b, dist = single_and_launched(ws, tmp_path, f"deepspeed_zero{stage}.yaml", single_cfg,
                                     _distill(ws, batch_size=1, grad_accum=3))
    assert dist["launch"] == "deepspeed" and dist["type"] == "DEEPSPEED" and dist["processes"] == 2
    assert dist["student_share"] == (0.5 if stage == 3 else 1.0) and dist["teacher_sharded"] == (stage == 3)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert_same_run(a, b)
    assert_same_weights(tmp_path / "single" / "model", tmp_path / "launched" / "model")


@pytest.mark.parametrize("env,message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "set `fsdp_version: 2`"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "pip install deepspeed"),
])
def test_a_launch_whose_distribution_is_not_in_effect_stops_with_one_line(ws, tmp_path, env, message):
    pytest.importorskip("accelerate")
    if "ACCELERATE_USE_DEEPSPEED" in env:
        try:
            import deepspeed  # noqa: F401
            pytest.skip("DeepSpeed is installed here: the refusal is for a machine without it")
        except ImportError:
            pass
    proc = _run([sys.executable, "-m", "teacherfit", "distill", "-c",
                 str(_write(tmp_path, "refused", _distill(ws, grad_accum=1)))], env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "refused" / "model").exists()


def test_two_process_align_writes_each_output_once(ws, tmp_path):
    """DAE under 2 processes: routing, held-out scores, results, report and log written once, by the main
    process; no duplicated or interleaved rows."""
    heldout = write_records(tmp_path / "heldout.jsonl", [Record.from_messages(
        [{"role": "user", "content": "def mul(a, b):"}, {"role": "assistant", "content": "    return a * b"}])])
    cfg = {"student": str(ws["student"]), "expert": str(ws["teacher"]), "reference": str(ws["student"]),
           "data": {"responses": [{"name": "t", "path": str(ws["data"])}]}, "models": {"device": "cpu"},
           "heldout": {"domain": str(heldout)},
           "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 2, "warmup_steps": 0, "lr": 1e-3}}
    proc = accelerate_launch(CONFIGS / "fsdp.yaml", "align", _write(tmp_path, "align", cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "align"
    results = json.loads((run / "results.json").read_text())
    assert results["distribution"]["processes"] == 2 and results["distribution"]["teacher_sharded"]
    routing = [json.loads(line) for line in (run / "routing.jsonl").read_text().splitlines()]
    assert len(routing) == len(QA) and len({r["id"] for r in routing}) == len(QA)
    assert [r["step"] for r in _log(run)] == [1, 2]
    assert set(results["heldout"]["after"]) == {"domain"} and results["heldout"]["table"]
    out = proc.stdout + proc.stderr
    assert out.count("routing (flag)") == 1 and out.count("domain (vs expert's responses): loss") == 1
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "checkpoints", "config.resolved.yaml", "heldout_before.json", "log.jsonl", "model", "report.html",
        "results.json", "routing.jsonl"]
