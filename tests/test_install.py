"""The GPU install recipe (requirements/gpu-vllm.txt, `make install-gpu`) resolves beside teacherfit.

A dry-run install of the whole GPU environment against PyPI: nothing is installed and no wheel is downloaded.
PyPI serves no separate metadata files (PEP 658) here, so the dry run reads each wheel's METADATA with HTTP
range requests (pip's `--use-feature=fast-deps`, a few hundred KB per wheel instead of vllm's ~320 MB and
torch's CUDA stack). Only pip 23.3 and newer skip the downloads in `--dry-run` (23.2 fetches every wheel once
resolved), so the test runs a pinned pip wheel, fetched into a temporary folder, not the venv's own pip.

pip's configuration is left as it is: on the CI machine /etc/xdg/pip caps torch at <=2.14.1, and the recipe's
torch==2.14.0 resolves under that cap, so the dry run checks what `make install-gpu` would really get there.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "requirements" / "gpu-vllm.txt"
# pip >= 23.3 downloads nothing in --dry-run; fast-deps is still there in 26.3 (pinned: it is experimental)
PIP_SPEC = "pip==26.3"
CHECKED = ("vllm", "torch", "transformers")
# what pip prints when PyPI stops answering mid-resolution (it retries, then treats the page as empty)
NETWORK_TROUBLE = ("Retrying (Retry(", "NewConnectionError", "ReadTimeoutError", "ConnectTimeoutError", "ProxyError")

pytestmark = pytest.mark.slow  # ~1.5 minutes: ~200 wheels' metadata over HTTP


def _unreachable() -> str | None:
    """Why PyPI cannot be reached (5 s connects), or None. Through the proxy when one is set."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        targets = [(parsed.hostname or "", parsed.port or 80)]
    else:
        targets = [("pypi.org", 443), ("files.pythonhosted.org", 443)]
    for host, port in targets:
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            via = "the proxy " if proxy else ""
            return f"PyPI cannot be reached ({via}{host}:{port}: {exc}): the GPU recipe's dry run needs it"
    return None


def _recipe() -> dict[str, Requirement]:
    reqs = {}
    for line in RECIPE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


def _requires(metadata: dict, extras: tuple[str, ...] = ("",)) -> dict[str, Requirement]:
    """A distribution's requirements that apply here, with the given extras, by canonical name (merged)."""
    out: dict[str, Requirement] = {}
    for text in metadata.get("requires_dist", []):
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(req.name)
        if name in out:
            out[name].specifier &= req.specifier
        else:
            out[name] = req
    return out


def _lower_bound(req: Requirement) -> Version:
    (floor,) = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    return floor


def test_gpu_recipe_resolves_beside_teacherfit(tmp_path):
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("the GPU recipe is for Linux x86_64/aarch64 (vllm's and torch's CUDA wheels)")
    reason = _unreachable()
    if reason:
        pytest.skip(reason)

    pip_dir = tmp_path / "pip"
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
         "--dest", str(pip_dir), PIP_SPEC],
        capture_output=True, text=True, timeout=300,
    )
    if fetched.returncode != 0:
        pytest.skip(f"could not fetch {PIP_SPEC} from PyPI: {fetched.stderr.strip()[-500:]}")
    (pip_wheel,) = pip_dir.glob("pip-*.whl")

    report_path = tmp_path / "report.json"
    cmd = [
        sys.executable, str(pip_wheel / "pip"), "install", "--dry-run", "--ignore-installed",
        "--report", str(report_path), "--quiet", "--disable-pip-version-check",
        "--use-feature=fast-deps",  # wheel METADATA by HTTP range requests: no multi-hundred-MB download
        "--only-binary", ":all:",  # no sdist is built (teacherfit itself is the local project, built for metadata)
        "-r", str(RECIPE), "-e", f"{ROOT}[vllm]",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    if proc.returncode != 0 and any(sign in proc.stderr for sign in NETWORK_TROUBLE):
        # an index page that could not be read looks like "no matching distribution" to pip: not the recipe's fault
        pytest.skip(f"PyPI could not be read during the dry run:\n{proc.stderr.strip()[-1500:]}")
    assert proc.returncode == 0, (
        f"the GPU recipe does not resolve beside teacherfit:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    )

    report = json.loads(report_path.read_text())
    resolved = {canonicalize_name(item["metadata"]["name"]): item for item in report["install"]}
    assert "teacherfit" in resolved, sorted(resolved)
    ours = resolved["teacherfit"]
    assert ours["download_info"]["url"] == ROOT.as_uri()
    assert ours["download_info"].get("dir_info", {}).get("editable") is True

    recipe = _recipe()
    assert set(CHECKED) <= set(recipe), f"{RECIPE.name} must pin {CHECKED}: has {sorted(recipe)}"
    our_reqs = _requires(ours["metadata"], extras=("", "vllm"))
    vllm_reqs = _requires(resolved["vllm"]["metadata"])
    for name in CHECKED:
        assert name in resolved, f"{name} is not in the install set"
        version = Version(resolved[name]["metadata"]["version"])
        assert recipe[name].specifier.contains(version, prereleases=True), (name, version, recipe[name])
        assert our_reqs[name].specifier.contains(version, prereleases=True), (name, version, our_reqs[name])
        if name != "vllm":
            assert vllm_reqs[name].specifier.contains(version, prereleases=True), (name, version, vllm_reqs[name])

    # the recipe's torch is the exact torch vllm requires (vllm pins it with ==), not merely one that resolved
    assert recipe["torch"].specifier == vllm_reqs["torch"].specifier, (recipe["torch"], vllm_reqs["torch"])
    # the lowest transformers the recipe allows (what `make test-lowest-transformers` runs the suite on)
    # is one that both vllm and teacherfit accept
    floor = _lower_bound(recipe["transformers"])
    assert vllm_reqs["transformers"].specifier.contains(floor), (floor, vllm_reqs["transformers"])
    assert our_reqs["transformers"].specifier.contains(floor), (floor, our_reqs["transformers"])
