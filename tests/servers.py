"""Real OpenAI-compatible servers on loopback, for tests of the remote backend."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def free_port() -> int:
    """A port the OS reports free right now (another process could still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def llama_cpp_server(
    gguf_path: str | Path,
    *,
    n_ctx: int = 2048,
    threads: int = 2,
    model_alias: str | None = None,
    port: int | None = None,
    startup_timeout_s: float = 120.0,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> Iterator[str]:
    """Serve a GGUF file with ``llama_cpp.server`` on a free loopback port; yields the ``/v1`` base URL.

    ``port``: a fixed port (a config that names the URL); a free one by default. ``on_start`` gets the server's process once it is ready (a test that kills a server mid-run keeps it).

    The server's output goes to a file rather than a pipe: a pipe nobody reads fills up and stalls the
    server. Its tail is the error message when the server dies or is not ready in time.
    """
    port = port or free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf_path),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        "--n_threads", str(threads),
    ]  # fmt: skip
    if model_alias:
        command += ["--model_alias", model_alias]
    with tempfile.TemporaryDirectory(prefix="llama-cpp-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not _ready(f"{base_url}/models"):
                if proc.poll() is not None:
                    raise RuntimeError(f"llama.cpp server exited with {proc.returncode}:\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"llama.cpp server not ready after {startup_timeout_s:g} s:\n{_tail(log_path)}"
                    )
                time.sleep(0.2)
            if on_start is not None:
                on_start(proc)
            yield base_url
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def serve_loopback(handler, state=None):
    """A real HTTP server for ``handler`` (a ``BaseHTTPRequestHandler`` class) on a free loopback port, in a
    thread; yields ``(its /v1 base URL, state)`` and shuts it down after."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
