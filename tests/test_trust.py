"""Bad input gets one clear line (exit 2) before any expensive work; nothing is mixed, duplicated or leaked.

Each test here failed on the code before it was written: a traceback, a silently accepted typo, a run that
mixed settings, a secret written to disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

import pytest
import yaml
from typer.testing import CliRunner

from teacherfit.cli import app
from teacherfit.config import ConfigError, GenerateConfig, load_config
from teacherfit.data import DataError, load_records
from teacherfit.pipelines.generate import run_generate
from teacherfit.remote import RemoteConfig
from test_remote import completion_body, error_body, fake_server
from tiny import save_tiny, tiny_llama

runner = CliRunner()


def fails_cleanly(*args, needle: str) -> str:
    """Run the CLI; it must exit 2 with an `error:` line containing ``needle`` and no traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    output = result.output
    assert result.exit_code == 2, output + repr(result.exception)
    assert "Traceback" not in output and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert needle in errors[0], output
    return errors[0]


@pytest.fixture()
def instructions(tmp_path):
    path = tmp_path / "instructions.jsonl"
    rows = [{"instruction": f"Name colour number {i}."} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny(tiny_llama(tokenizer, seed=21), tokenizer, tmp_path_factory.mktemp("trust") / "model")


# ----------------------------------------------------------------------------------- configs and flags


def test_an_unparsable_set_value_is_one_line(instructions, tmp_path):
    line = fails_cleanly("generate", "--instructions", instructions, "--teacher", "a=x", "--out", tmp_path / "o",
                         "--set", "decoding={max_new_tokens: 4", needle="--set")
    assert "not valid YAML" in line and not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused(instructions, model_dir, tmp_path):
    (tmp_path / "taken").write_text("x")
    fails_cleanly("generate", "--instructions", instructions, "--teacher", f"a={model_dir}",
                  "--out", tmp_path / "taken", needle="is a file")


def test_config_file_errors_name_the_file_and_line(tmp_path):
    fails_cleanly("generate", "--config", tmp_path, needle="is a directory")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"instructions: a.jsonl\nteachers: []\n# caf\xe9\n")
    fails_cleanly("generate", "--config", bad, needle=f"{bad}:3: not UTF-8")
    twice = tmp_path / "twice.yaml"
    twice.write_text("instructions: a.jsonl\ndecoding:\n  max_new_tokens: 8\n  max_new_tokens: 16\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:4: .*duplicate key 'max_new_tokens' \(first on line 3"):
        load_config(GenerateConfig, twice)


OPENAI = {"name": "a", "backend": "openai", "remote": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}}


@pytest.mark.parametrize("field, suggestion, overrides", [
    ("decoding.temprature", "temperature", ["decoding.temprature=0.7"]),
    ("decoding.max_tokens", "max_new_tokens", ["decoding.max_tokens=64"]),
    ("teachers.0.remote.concurency", "concurrency", ["teachers=[" + json.dumps(OPENAI)[:-2] + ', "concurency": 4}}]']),
    ("teachers.0.remote.api_key", "api_key_env", ["teachers=[" + json.dumps(OPENAI)[:-2] + ', "api_key": "sk-x"}}]']),
])
def test_typos_inside_decoding_and_remote_are_errors_with_a_suggestion(instructions, field, suggestion, overrides):
    with pytest.raises(ConfigError, match=rf"`{field}`: Extra inputs.*did you mean `{suggestion}`"):
        load_config(GenerateConfig, None, overrides, instructions=str(instructions),
                    teachers=[{"name": "a", "model": "x"}])


def test_a_base_url_that_is_not_a_url_is_a_config_error(instructions):
    teacher = {"name": "a", "backend": "openai", "remote": {"base_url": "127.0.0.1:8000/v1", "model": "m"}}
    with pytest.raises(ConfigError, match="not an http"):
        load_config(GenerateConfig, None, instructions=str(instructions), teachers=[teacher])


def test_inspect_data_on_error_typo_is_a_usage_error(instructions):
    result = runner.invoke(app, ["inspect-data", str(instructions), "--on-error", "skpi"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "skpi" in result.output


# ------------------------------------------------------------------------------------------ data files


def test_deeply_nested_json_is_a_malformed_row_not_a_crash(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps({"instruction": "ok"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"deep.jsonl:2: JSON nested too deeply"):
        load_records(deep)
    assert len(load_records(deep, on_error="skip").records) == 1
    whole = tmp_path / "deep.json"
    whole.write_text("[" * 100_000 + "]" * 100_000)
    fails_cleanly("inspect-data", whole, needle="nested too deeply")


def test_a_lone_surrogate_is_a_malformed_row(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"instruction": "ok"}\n{"instruction": "bad \\ud800 text"}\n')
    with pytest.raises(DataError, match=r"surrogate.jsonl:2: 'instruction' holds a lone surrogate"):
        load_records(path)
    fails_cleanly("inspect-data", path, needle="lone surrogate")


def test_the_skip_hint_names_the_config_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "ok"}\n{"nothing": 1}\n')
    with pytest.raises(DataError, match=r"on_error: skip .*--set on_error=skip"):
        load_records(path)


def test_a_file_whose_every_row_is_skipped_is_an_error(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_text('{"nothing": 1}\n{"nothing": 2}\n')
    with pytest.raises(DataError, match=r"all 2 rows are malformed"):
        load_records(path, on_error="skip")


# ---------------------------------------------------------------------- generate: checks before work


def test_a_later_teachers_typo_fails_before_the_first_teacher_generates(instructions, model_dir, tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    fails_cleanly("generate", "--instructions", instructions, "--teacher", f"good={model_dir}",
                  "--teacher", f"typo={tmp_path / 'no-such-model'}", "--out", out, needle="no-such-model")
    assert time.perf_counter() - start < 20
    assert not out.exists()  # failed on its input: no run directory that looks started


def test_a_file_teacher_that_answers_nothing_is_refused(instructions, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"instruction": "Something else entirely.", "output": "Yes."}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"instructions": str(instructions), "out": str(tmp_path / "run"),
                                   "teachers": [{"name": "f", "backend": "file", "responses": str(other)}]}))
    fails_cleanly("generate", "--config", cfg, needle="answers none of the 3 instructions")


def test_an_unset_api_key_variable_fails_before_any_request(instructions, tmp_path, monkeypatch):
    monkeypatch.delenv("TEACHERFIT_UNSET_KEY", raising=False)
    with fake_server(lambda state, n, body, headers: (200, completion_body())) as (base_url, state):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"instructions": str(instructions), "out": str(tmp_path / "run"), "teachers": [
            {"name": "api", "backend": "openai",
             "remote": {"base_url": base_url, "model": "fake", "api_key_env": "TEACHERFIT_UNSET_KEY"}}]}))
        fails_cleanly("generate", "--config", cfg, needle="TEACHERFIT_UNSET_KEY is not set")
    assert state.requests == []


# ------------------------------------------------------------------------------- servers and secrets


def _remote_config(tmp_path, instructions, base_url, **remote):
    cfg = tmp_path / "remote.yaml"
    cfg.write_text(yaml.safe_dump({
        "instructions": str(instructions), "out": str(tmp_path / "run"), "decoding": {"max_new_tokens": 4},
        "teachers": [{"name": "api", "backend": "openai",
                      "remote": {"base_url": base_url, "model": "fake", "max_retries": 0, "timeout_s": 5, **remote}}]}))
    return cfg


def test_a_closed_port_is_one_line(instructions, tmp_path):
    from servers import free_port

    cfg = _remote_config(tmp_path, instructions, f"http://127.0.0.1:{free_port()}/v1")
    fails_cleanly("generate", "--config", cfg, needle="is the server running")
    assert json.loads((tmp_path / "run" / "failed.json").read_text())["error"].startswith("prompt")


def test_a_401_is_one_line(instructions, tmp_path):
    with fake_server(lambda state, n, body, headers: (401, error_body("bad key"))) as (base_url, _):
        fails_cleanly("generate", "--config", _remote_config(tmp_path, instructions, base_url), needle="HTTP 401")


def test_credentials_in_base_url_are_never_written_or_shown(instructions, tmp_path, caplog):
    secret, token = "hunter2-secret", "tok-0123456789"
    with fake_server(lambda state, n, body, headers: (200, completion_body())) as (base_url, state):
        url = base_url.replace("http://", f"http://alice:{secret}@") + f"?api-key={token}"
        result = runner.invoke(app, ["generate", "--config", str(_remote_config(tmp_path, instructions, url))])
    assert result.exit_code == 0, result.output
    assert len(state.requests) == 3
    written = "".join(p.read_text() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock")
    assert "alice:***@" in written  # the URL is recorded, masked
    for text in (written, result.output, caplog.text):
        assert secret not in text and token not in text
    from teacherfit.remote import redact_url

    assert redact_url(url) == base_url.replace("http://", "http://alice:***@") + "?api-key=***"


def test_openai_api_key_is_not_sent_to_a_server_that_did_not_ask_for_it(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-you")
    from teacherfit.remote import api_key

    assert api_key(RemoteConfig(base_url="http://127.0.0.1:8000/v1", model="m")) == "EMPTY"
    assert api_key(RemoteConfig(base_url="https://api.openai.com/v1", model="m")) == "sk-not-for-you"
    assert api_key(RemoteConfig(base_url="http://h/v1", model="m", api_key_env="OPENAI_API_KEY")) == "sk-not-for-you"
    with fake_server(lambda state, n, body, headers: (200, completion_body())) as (base_url, state):
        from teacherfit.generation import DecodingConfig
        from teacherfit.remote import OpenAICompatibleGenerator

        gen = OpenAICompatibleGenerator(RemoteConfig(base_url=base_url, model="fake"))
        list(gen.generate([[{"role": "user", "content": "hi"}]], DecodingConfig(max_new_tokens=2)))
    assert state.authorizations == ["Bearer EMPTY"]


# ------------------------------------------------------------------------------- resume and concurrency


def _generate(instructions, model_dir, out, **decoding):
    return run_generate(load_config(GenerateConfig, None, instructions=str(instructions), out=str(out),
                                    teachers=[{"name": "t", "model": str(model_dir)}],
                                    decoding={"max_new_tokens": 3, **decoding}))


def test_changed_decoding_regenerates_instead_of_mixing(instructions, model_dir, tmp_path, capsys):
    from teacherfit.config import finish_runs

    out = tmp_path / "gen"
    first = _generate(instructions, model_dir, out)
    finish_runs()
    assert first.teachers[0].generated == 3
    again = _generate(instructions, model_dir, out)  # same settings: all reused
    finish_runs()
    assert (again.teachers[0].generated, again.teachers[0].resumed) == (0, 3)
    changed = _generate(instructions, model_dir, out, max_new_tokens=5)
    finish_runs()
    assert (changed.teachers[0].generated, changed.teachers[0].resumed) == (3, 0)
    said = " ".join(capsys.readouterr().err.split())  # the console writes to stderr, wrapped
    assert "settings changed since 3 rows were generated (decoding.max_new_tokens: 3 -> 5)" in said
    rows = load_records(out / "responses" / "t.jsonl").records
    assert len(rows) == 3 and {r.meta["decoding"]["max_new_tokens"] for r in rows} == {5}
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["decoding"]["max_new_tokens"] == 5  # the config describes what the final set holds


def test_rows_from_before_settings_digests_are_not_reused(instructions, model_dir, tmp_path, capsys):
    """A partial file written by an earlier version (rows keyed by id only) resumes: its rows are kept, marked,
    and regenerated, because nothing says which settings made them."""
    from teacherfit.config import finish_runs
    from teacherfit.data import load_records as read

    out = tmp_path / "old"
    (out / "responses").mkdir(parents=True)
    old_rows = [dict(r.with_response("from an old run").to_row(), teacher={"name": "t"})
                for r in read(instructions).records]
    (out / "responses" / "t.partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    run = _generate(instructions, model_dir, out)
    finish_runs()
    assert (run.teachers[0].generated, run.teachers[0].resumed) == (3, 0)
    assert "settings changed since 3 rows were generated" in " ".join(capsys.readouterr().err.split())
    final = read(out / "responses" / "t.jsonl").records
    assert len(final) == 3 and all(r.response != "from an old run" for r in final)
    kept = [json.loads(line) for line in (out / "responses" / "t.partial.jsonl").read_text().splitlines()]
    assert [r["settings"] for r in kept[:3]] == ["unknown"] * 3 and len(kept) == 6


def test_a_second_process_on_the_same_out_is_refused(instructions, model_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)  # another process's lock (a separate open file)
    os.write(fd, b"pid 424242 on elsewhere since 2026-01-01 00:00:00\n")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        fails_cleanly("generate", "--instructions", instructions, "--teacher", f"a={model_dir}", "--out", out,
                      needle="in use by pid 424242")
        assert not (out / "responses").exists()
    finally:
        os.close(fd)


def test_best_of_rank_that_is_not_a_rank_run_names_the_folder(tmp_path):
    from teacherfit.config import TrainData
    from teacherfit.distill.examples import training_records

    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"data.best_of_rank: {tmp_path} is not a finished `teacherfit rank` run "
                                         r"\(no per_sample.parquet\)"):
        training_records(TrainData(best_of_rank=tmp_path))


def test_a_run_that_fails_after_it_started_is_marked_failed(instructions, tmp_path):
    with fake_server(lambda state, n, body, headers: (400, error_body("no such model"))) as (base_url, _):
        fails_cleanly("generate", "--config", _remote_config(tmp_path, instructions, base_url), needle="HTTP 400")
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert "no such model" in failed["error"]
    assert (tmp_path / "run" / "config.resolved.yaml").exists()
    with fake_server(lambda state, n, body, headers: (200, completion_body())) as (base_url, _):
        result = runner.invoke(app, ["generate", "--config", str(_remote_config(tmp_path, instructions, base_url))])
    assert result.exit_code == 0 and not (tmp_path / "run" / "failed.json").exists()  # the retry succeeded


def test_a_bad_base_url_with_a_password_is_not_echoed(instructions):
    teacher = {"name": "a", "backend": "openai", "remote": {"base_url": "ftp://bob:pa55word-xyz@h/v1", "model": "m"}}
    with pytest.raises(ConfigError) as err:
        load_config(GenerateConfig, None, instructions=str(instructions), teachers=[teacher])
    assert "not an http" in str(err.value) and "pa55word-xyz" not in str(err.value)


def test_replaced_weights_at_the_same_path_are_new_settings(instructions, tokenizer, tmp_path):
    from teacherfit.config import finish_runs

    path = save_tiny(tiny_llama(tokenizer, seed=31), tokenizer, tmp_path / "m")
    first = _generate(instructions, path, tmp_path / "gen")
    finish_runs()
    save_tiny(tiny_llama(tokenizer, seed=32, layers=1), tokenizer, path)  # new weights, same folder
    second = _generate(instructions, path, tmp_path / "gen")
    finish_runs()
    assert first.teachers[0].generated == 3 and (second.teachers[0].generated, second.teachers[0].resumed) == (3, 0)


def test_two_real_processes_on_one_out_one_runs_the_other_is_refused(instructions, tmp_path):
    """A real second `teacherfit generate` on the same --out while the first waits on its server: refused with
    the first one's pid; the first then finishes with exactly one row per instruction."""
    import subprocess
    import sys

    def slow(state, n, body, headers):
        state.release.wait(30)  # the first process stays inside its run until the test lets it go
        return 200, completion_body()

    with fake_server(slow) as (base_url, state):
        cfg = _remote_config(tmp_path, instructions, base_url)
        first = subprocess.Popen([sys.executable, "-m", "teacherfit", "generate", "-c", str(cfg)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lock = tmp_path / "run" / ".lock"
        deadline = time.time() + 60
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text()) and time.time() < deadline:
            assert first.poll() is None, first.stdout.read().decode()
            time.sleep(0.1)
        fails_cleanly("generate", "--config", cfg, needle=f"in use by pid {first.pid} on")
        state.release.set()
        assert first.wait(60) == 0, first.stdout.read().decode()
    rows = (tmp_path / "run" / "responses" / "api.jsonl").read_text().splitlines()
    assert len(rows) == 3 and len({json.loads(r)["id"] for r in rows}) == 3
