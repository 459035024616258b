from pathlib import Path

import pytest

from teacherfit.config import (
    ConfigError,
    EvaluateConfig,
    GenerateConfig,
    QuickstartConfig,
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
    name = path.name
    cls = {"quickstart.yaml": QuickstartConfig, "generate.yaml": GenerateConfig, "evaluate.yaml": EvaluateConfig}.get(name)
    if cls is None:
        cls = GenerateConfig if name.startswith("generate") else RankConfig if name.startswith("rank") else None
    if name.startswith("study"):
        from teacherfit.config import StudyConfig

        cls = StudyConfig
    if cls is None:
        from teacherfit.config import CorrelateConfig

        cls = CorrelateConfig
    load_config(cls, path)
