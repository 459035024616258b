"""Running real `teacherfit` training commands in subprocesses, and killing them, for resume tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def start_cli(command: str, cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "teacherfit", command, "-c", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def write_config(folder: Path, name: str, cfg: dict) -> Path:
    """``cfg`` as the YAML file ``folder/name.yaml`` (a command's ``-c``)."""
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def killed_and_resumed(command: str, ref: tuple[Path, Path], killed: tuple[Path, Path],
                       kill_after: str = "step-0000006") -> tuple[list[dict], list[dict]]:
    """Run ``ref = (config, run_dir)`` whole; run ``killed`` until checkpoint ``kill_after`` exists, SIGKILL it,
    and run it again (it must resume). Returns both runs' JSONL logs."""
    proc = start_cli(command, ref[0])
    assert proc.wait(timeout=600) == 0, proc.stdout.read().decode()
    cfg, run_dir = killed
    proc = start_cli(command, cfg)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / kill_after / "state.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model").exists(), "the run finished before it could be killed"
    proc = start_cli(command, cfg)
    output = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, output
    assert "resuming from step-" in output
    return read_log(ref[1]), read_log(run_dir)
