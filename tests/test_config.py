import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from teacherfit.config import (
    ConfigError,
    GenerateConfig,
    RankConfig,
    apply_overrides,
    load_config,
    prepare_run_dir,
)

REPO = Path(__file__).resolve().parents[1]


def test_overrides_are_dotted_and_yaml_typed():
    data = apply_overrides({"reward": {"kind": "judge"}}, ["beta=0.25", "reward.model=m", "limit=3", "x.y.z=[1, 2]"])
    assert data == {"reward": {"kind": "judge", "model": "m"}, "beta": 0.25, "limit": 3, "x": {"y": {"z": [1, 2]}}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])


def test_validation_error_names_the_field(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("student: s\nreward: {kind: oracle}\nbootstrap: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(RankConfig, path)
    text = str(err.value)
    assert "field `reward.kind`" in text and "field `bootstrap`" in text and str(path) in text


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="field `betta`"):
        load_config(RankConfig, None, ["student=s", "betta=1"])


def test_paths_in_a_config_file_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "gen.yaml"
    path.write_text("instructions: data/i.jsonl\nteachers: [{name: a, backend: file, responses: r.jsonl}]\n")
    cfg = load_config(GenerateConfig, path)
    assert cfg.instructions == (tmp_path / "sub" / "data" / "i.jsonl").resolve()
    assert cfg.teachers[0].responses == (tmp_path / "sub" / "r.jsonl").resolve()


def test_cli_values_then_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("student: from-file\nbeta: 2\n")
    cfg = load_config(RankConfig, path, ["beta=3"], student="from-cli")
    assert cfg.student == "from-cli" and cfg.beta == 3


def test_teacher_names_must_be_file_safe():
    with pytest.raises(ConfigError, match="teachers.0.name"):
        load_config(GenerateConfig, None, ["instructions=i.jsonl", "teachers=[{name: 'a/b', model: m}]"])


def test_run_dir_holds_resolved_config_and_is_stable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RankConfig, None, ["student=s"])
    a = prepare_run_dir(cfg, "rank")
    b = prepare_run_dir(cfg, "rank")
    assert a == b and a.parent == (tmp_path / "runs").resolve()
    text = (a / "config.resolved.yaml").read_text()
    assert "student: s" in text and "beta:" in text  # defaults are written out too


@pytest.mark.parametrize(
    "path", sorted(REPO.glob("configs/*.yaml")) + sorted(REPO.glob("src/teacherfit/assets/**/*.yaml")),
    ids=lambda p: p.name,
)
def test_every_example_config_parses(path):
    from teacherfit.config import COMMAND_CONFIGS

    name = path.name
    # a config is named after its command (generate-dae.yaml, study-small.yaml, cache-teacher-dae.yaml)
    command = max((c for c in COMMAND_CONFIGS if name.startswith(c)), key=len, default=None)
    assert command is not None, f"{name}: name example configs after their command"
    load_config(COMMAND_CONFIGS[command], path)


def test_config_command_lists_every_field_with_type_default_and_description():
    """`teacherfit config distill` is generated from DistillConfig: every field (nested ones dotted) appears with
    its type, its default and a description, and a section filter keeps only that section."""
    from typer.testing import CliRunner

    from teacherfit.cli import app
    from teacherfit.config import COMMAND_CONFIGS, DistillConfig, describe_fields

    result = CliRunner().invoke(app, ["config", "distill"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    heads = {line.split(":")[0]: line for line in lines if line and not line.startswith(" ")}
    rows = describe_fields(DistillConfig)
    assert len(rows) > 40
    for row in rows:
        assert row["field"] in heads, row["field"]
        assert row["description"], f"{row['field']} has no description"
    # a naive walk of the pydantic model, written here: every field, nested sections dotted, lists as []
    import typing

    def walk(cls, prefix=""):
        for name, info in cls.model_fields.items():
            key = prefix + (info.alias or name)
            yield key, info
            ann = info.annotation
            args = [ann] + list(typing.get_args(ann))
            for arg in args:
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    yield from walk(arg, key + ".")
                    break
                sub = [a for a in typing.get_args(arg) if isinstance(a, type) and issubclass(a, BaseModel)]
                if sub and typing.get_origin(arg) is list:
                    yield from walk(sub[0], key + "[].")
                    break
    walked = dict(walk(DistillConfig))
    assert set(walked) == {r["field"] for r in rows}
    assert heads["kd.lambda"] == "kd.lambda: float = 1.0"
    assert heads["train.lr"] == "train.lr: float = 2e-05"
    assert heads["student"] == "student: str (required)"
    assert heads["kd.divergence"].startswith("kd.divergence: 'forward_kl' | 'reverse_kl'")
    assert walked["train.max_steps"].default is None and heads["train.max_steps"] == "train.max_steps: int | null = null"
    assert "learning_rate -> train.lr" in result.output
    section = CliRunner().invoke(app, ["config", "distill", "kd"])
    assert section.exit_code == 0 and "kd.temperature" in section.output and "train.lr" not in section.output
    for command, cls in COMMAND_CONFIGS.items():  # every command: every field described
        assert all(r["description"] for r in describe_fields(cls)), command
    bad = CliRunner().invoke(app, ["config", "distil"])
    assert bad.exit_code == 2 and "did you mean 'distill'" in bad.output


@pytest.mark.parametrize("override,hint", [
    ("learning_rate=1e-4", "field `learning_rate`: Extra inputs are not permitted; that is the TRL/Transformers "
                           "name: teacherfit's is `train.lr`"),
    ("train.per_device_train_batch_size=2", "field `train.per_device_train_batch_size`: Extra inputs are not "
                                            "permitted; that is the TRL/Transformers name: teacherfit's is `batch_size`"),
    ("num_train_epochs=3", "teacherfit's is `train.epochs`"),
    ("gradient_accumulation_steps=4", "teacherfit's is `train.grad_accum`"),
    ("output_dir=runs/x", "teacherfit's is `out`"),
    ("lmbda=0.5", "`kd.lambda` is something else: the weight of KD against CE"),
    ("kd.beta=0.5", "`kd.divergence_kwargs.beta`"),
    ("train.lrr=1", "did you mean `lr`?"),
])
def test_trl_names_are_refused_with_the_teacherfit_name(override, hint):
    from teacherfit.config import DistillConfig

    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, None, ["student=s", "data={responses: []}", override])
    assert hint in str(err.value) and "\n" not in str(err.value)


def test_trl_names_are_only_suggested_where_the_command_has_the_field():
    with pytest.raises(ConfigError) as err:  # rank has no training section: no `train.lr` to point to
        load_config(RankConfig, None, ["student=s", "learning_rate=1e-4"])
    assert "TRL" not in str(err.value)


def test_config_imports_nothing_heavy():
    """`config` imports only pydantic, yaml and the standard library (docs/architecture.md): loading a config,
    or `--help`, never pays for torch, openai or numpy. Checked in a fresh interpreter."""
    heavy = ("torch", "transformers", "openai", "numpy", "scipy", "accelerate", "datasets")
    code = f"import sys, teacherfit.config; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
    from teacherfit import generation, metrics, remote
    from teacherfit.config import (
        DEFAULT_BETA,
        DecodingConfig,
        RemoteConfig,
        RemoteError,
        VLLMEngineConfig,
    )

    # the classes moved here; the modules that used to define them hand out the same objects
    assert generation.DecodingConfig is DecodingConfig and generation.VLLMEngineConfig is VLLMEngineConfig
    assert remote.RemoteConfig is RemoteConfig and remote.RemoteError is RemoteError
    assert metrics.DEFAULT_BETA == DEFAULT_BETA
