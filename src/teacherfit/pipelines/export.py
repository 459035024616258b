"""`teacherfit export`: a Hugging Face model folder (a distilled student) -> one GGUF file for llama.cpp.

No importable library converts a Hugging Face model to GGUF; llama.cpp's own ``convert_hf_to_gguf.py`` does,
so it is run as it is, in a subprocess of this Python, never copied into teacherfit. It comes from
``--converter`` or ``$TEACHERFIT_LLAMA_CPP`` (a llama.cpp checkout, or the script itself), or else from the
llama-cpp-python source distribution on PyPI at the version pinned below: downloaded with pip, checked against
its pinned sha256, and only the converter's own files unpacked, once, into the cache.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any

from teacherfit.models import cache_dir, gguf_damage, sha256_file

# The sdist of the llama-cpp-python we serve with (the `server` extra), so the converter writes what that
# runtime reads. PyPI never changes a released file: a different digest means a different file.
LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SCRIPT = "convert_hf_to_gguf.py"
# What the script reads from its own tree: its model classes (`conversion/`), the gguf writer of the same commit
# (`gguf-py/`; PyPI's gguf, a teacherfit dependency, may be another version) and the chat templates a few
# architectures take from `models/templates/` (DeepSeek, MiniMax, Kimi, RWKV, Mistral). LICENSE: the MIT notice.
TREE = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "models/templates/", "LICENSE")

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# q8_0: llama.cpp's near-lossless quantisation (8 bits per weight and a scale per 32), half the size of f16 and
# faster to serve on a CPU, which reads every weight once per token. f32/f16 are for checking numbers exactly.
DEFAULT_OUTTYPE = "q8_0"

# The converter's imports that teacherfit's own dependencies do not bring (module -> what to pip install).
# sentencepiece: every Llama-family model (SmolLM2 included) imports it while writing its vocabulary.
EXPORT_EXTRA = {"sentencepiece": "sentencepiece"}
OPTIONAL_IMPORTS = {"google": "protobuf", "mistral_common": "mistral-common"}  # T5/BERT; Mistral's own format


class ExportError(ValueError):
    """A model could not be exported; the message is one line that says what to do."""


def run_export(model: str | Path, out: str | Path, *, outtype: str | None = None,
               converter: str | Path | None = None) -> dict[str, Any]:
    """Convert the model folder ``model`` to the GGUF file ``out``; returns its path, size, outtype, sha256 and
    where the converter came from. The file appears whole or not at all (written beside ``out``, then renamed)."""
    model, out, outtype = Path(model).expanduser(), Path(out).expanduser(), outtype or DEFAULT_OUTTYPE
    _check_inputs(model, out, outtype)
    script, source = find_converter(converter)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".teacherfit-export-{uuid.uuid4().hex[:12]}.gguf"  # the converter creates it (umask mode)
    try:
        env = dict(os.environ)
        gguf_py = script.parent / "gguf-py"
        if gguf_py.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gguf_py), env.get("PYTHONPATH")]))
        code, last = _run_streaming([sys.executable, str(script), str(model), "--outfile", str(tmp),
                                     "--outtype", outtype], env)
        if code != 0:
            raise ExportError(f"llama.cpp's converter could not export {model} (exit {code}): {_explain(last)}")
        if reason := gguf_damage(tmp):
            raise ExportError(f"llama.cpp's converter exited 0 but wrote no complete GGUF for {model} ({reason})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "size": out.stat().st_size, "outtype": outtype, "sha256": sha256_file(out),
            "model": str(model), "converter": source}


def _check_inputs(model: Path, out: Path, outtype: str) -> None:
    """Everything a user can get wrong, before the converter is looked for (a download) or run."""
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if not model.is_dir():
        raise ExportError(f"model folder not found: {model} (give a Hugging Face folder, e.g. a distill run's model/)")
    if not (model / "config.json").is_file():
        raise ExportError(f"{model} has no config.json: not a Hugging Face model folder")
    if not any(model.glob("*.safetensors")):
        raise ExportError(f"{model} has no *.safetensors weights: save the model with save_pretrained first")
    if out.suffix != ".gguf" or out.is_dir():
        raise ExportError(f"--out {out}: give the path of a .gguf file to write")
    missing = sorted({pip for module, pip in EXPORT_EXTRA.items() if importlib.util.find_spec(module) is None})
    if missing:
        raise ExportError(f"llama.cpp's converter needs {', '.join(missing)}: pip install 'teacherfit[export]' "
                          f"(or pip install {' '.join(missing)})")


def find_converter(converter: str | Path | None = None) -> tuple[Path, dict[str, str]]:
    """llama.cpp's converter script, and where it came from (for the provenance)."""
    given = converter or os.environ.get("TEACHERFIT_LLAMA_CPP")
    if given:
        path = Path(given).expanduser()
        script = path / SCRIPT if path.is_dir() else path
        if not script.is_file():
            raise ExportError(f"no llama.cpp converter at {path} (from --converter or TEACHERFIT_LLAMA_CPP): give a "
                              f"llama.cpp checkout holding {SCRIPT}, or the script itself")
        return script.resolve(), {"path": str(script.resolve())}
    return _sdist_converter(), {"sdist": f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "sha256": LLAMA_CPP_PYTHON_SHA256}


def _sdist_converter() -> Path:
    """The converter from the pinned llama-cpp-python sdist: downloaded, verified and unpacked once (cached)."""
    root = cache_dir() / "llama.cpp"
    tree = root / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if (tree / SCRIPT).is_file():  # the tree is renamed into place whole, so the script means it is complete
        return tree / SCRIPT
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        _download(sdist)
    actual = sha256_file(sdist)
    if actual != LLAMA_CPP_PYTHON_SHA256:
        raise ExportError(f"sha256 mismatch for {sdist}: expected {LLAMA_CPP_PYTHON_SHA256}, got {actual}; refusing "
                          "to run code from it. Delete the file and run again to download it afresh")
    _unpack(sdist, tree)
    sdist.unlink()  # 77 MB, of which the converter's files are about 2
    return tree / SCRIPT


def _download(sdist: Path) -> None:
    """``pip download`` the sdist into a temporary folder beside ``sdist``, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(dir=sdist.parent, prefix=".download-"))
    try:
        spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
        print(f"fetching llama.cpp's converter, once: {spec} (source, 77 MB) from PyPI", file=sys.stderr)
        # --no-binary for this package only: pip builds the sdist's metadata first, and `:all:` would also build its
        # build backend (scikit-build-core and kin) from source: 8.6 min instead of 12 s on a 2-core machine
        code, last = _run_streaming([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                                     "llama-cpp-python", spec, "-d", str(tmp)])
        if code != 0 or not (tmp / sdist.name).is_file():
            raise ExportError(f"could not download {spec} (llama.cpp's converter) with pip: {last or f'exit {code}'}; "
                              "or give --converter (or TEACHERFIT_LLAMA_CPP) a llama.cpp checkout")
        os.replace(tmp / sdist.name, sdist)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpack(sdist: Path, tree: Path) -> None:
    """Only the converter's files (``TREE``) of the sdist's vendored llama.cpp, into ``tree`` (renamed in whole)."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(dir=tree.parent, prefix=".unpack-"))
    try:
        with tarfile.open(sdist) as tar:
            members = [m.replace(name=m.name[len(prefix):]) for m in tar
                       if m.isfile() and m.name.startswith(prefix) and m.name[len(prefix):].startswith(TREE)]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(tmp, tree)
    except OSError:  # another process unpacked it first
        if not (tree / SCRIPT).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_streaming(command: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``command``, forwarding its stderr as it comes (stdout goes straight through); returns the exit code and
    the last non-empty line of stderr: a traceback's last line, or the converter's error."""
    last = ""
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) as proc:
        for raw in proc.stderr:  # bytes, so progress bars keep their carriage returns
            text = raw.decode("utf-8", "replace")
            sys.stderr.write(text)
            sys.stderr.flush()
            lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
            last = lines[-1] if lines else last
    return proc.returncode, last


def _explain(last: str) -> str:
    """The converter's last stderr line, without its logger prefix, and what to install for a missing module."""
    last = re.sub(r"^(ERROR|CRITICAL):[\w.-]+:", "", last).strip() or "no message"
    if match := re.search(r"No module named '([\w.]+)'", last):
        module = match.group(1).split(".")[0]
        pip = {**EXPORT_EXTRA, **OPTIONAL_IMPORTS}.get(module, module)
        return f"{last}: pip install {pip}"
    return last
