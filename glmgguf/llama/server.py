"""Run llama-server for tests and evaluation, and load the `llama_cpp` binding against our build."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from glmgguf.errors import GlmggufError
from glmgguf.llama.build import LlamaBuildError, Toolchain, ensure_toolchain


class LlamaServerError(GlmggufError, RuntimeError):
    """llama-server failed to start or a request to it failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# a llama.cpp log line of level E: "0.00.007.930 E llama_model_load: error loading model: ..."
_ERROR_LINE = re.compile(r"^\S+ E (?:\w+ +)?(.*)$")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def startup_error(path: Path) -> str:
    """The first error llama-server logged (the most specific: later lines only repeat that loading failed),
    else the log's last line."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [m.group(1) for line in lines if (m := _ERROR_LINE.match(line))]
    return errors[0] if errors else next((s for s in reversed(lines) if s.strip()), "(empty log)")


class LlamaServer:
    """`with LlamaServer(gguf) as srv: srv.chat([...])` - a llama-server on a free local port.

    `extra_args` go to llama-server verbatim (e.g. `["-c", "2048", "-t", "2"]`). Output goes to
    `log_path` (a temp file by default). Startup waits for `GET /health` to return 200.
    """

    def __init__(self, model: str | os.PathLike[str], extra_args: Sequence[str] = (), *,
                 toolchain: Toolchain | None = None, host: str = "127.0.0.1", port: int | None = None,
                 log_path: str | os.PathLike[str] | None = None, startup_timeout: float = 300.0,
                 request_timeout: float = 600.0) -> None:
        self.model = Path(model)
        self.extra_args = list(extra_args)
        self.toolchain = toolchain
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:8123`."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> LlamaServer:
        """Start the server and wait until it is healthy; stops it again on any failure."""
        toolchain = self.toolchain or ensure_toolchain()
        self.port = self.port or free_port(self.host)
        cmd = [str(toolchain.server), "-m", str(self.model), "--host", self.host, "--port", str(self.port),
               *self.extra_args]
        with open(self.log_path, "wb") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LlamaServerError(f"llama-server exited (code {self.proc.returncode}) during startup: "
                                       f"{startup_error(self.log_path)} (log {self.log_path})\n"
                                       f"{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.2)
        raise LlamaServerError(f"llama-server not healthy after {self.startup_timeout:.0f} s; "
                               f"log {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit within 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def request(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET `path` (or POST `payload` as JSON) and return the decoded JSON reply."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")[:2000]
            raise LlamaServerError(f"{path}: HTTP {e.code}: {body}") from e

    def chat(self, messages: list[dict[str, Any]], **sampling: Any) -> dict[str, Any]:
        """OpenAI-style `/v1/chat/completions` (non-streaming); `sampling` e.g. temperature, max_tokens."""
        return self.request("/v1/chat/completions", {"messages": messages, **sampling, "stream": False})

    def completion(self, prompt: str | list[int], **params: Any) -> dict[str, Any]:
        """llama.cpp's native `/completion` (non-streaming); `params` e.g. n_predict, n_probs, seed."""
        return self.request("/completion", {"prompt": prompt, **params, "stream": False})


def _mapped_libraries() -> list[Path]:
    """Shared objects mapped into this process (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    parts = [line.split(maxsplit=5) for line in lines]
    return sorted({Path(p[5]) for p in parts if len(p) == 6 and ".so" in p[5]})


def llama_cpp_module(toolchain: Toolchain) -> ModuleType:
    """Import the sdist's `llama_cpp` binding so that it uses this toolchain's libllama.

    Sets `LLAMA_CPP_LIB_PATH=<lib_dir>`. A process can hold only one libllama: if `llama_cpp` was
    already imported from elsewhere, or another libllama/libggml is mapped, this raises.
    """
    if toolchain.python_package_dir is None:
        raise LlamaBuildError(f"toolchain {toolchain.bin_dir} has no llama_cpp binding (user-given source); "
                              "build from the pinned sdist for it")
    pkg = toolchain.python_package_dir / "llama_cpp"
    loaded = sys.modules.get("llama_cpp")
    if loaded is None:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(toolchain.lib_dir)
        spec = importlib.util.spec_from_file_location("llama_cpp", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules["llama_cpp"] = loaded
        try:
            spec.loader.exec_module(loaded)
        except BaseException:
            for name in [m for m in sys.modules if m == "llama_cpp" or m.startswith("llama_cpp.")]:
                del sys.modules[name]
            raise
    if Path(loaded.__file__ or "").parent != pkg:
        raise LlamaBuildError(f"llama_cpp is already imported from {loaded.__file__}, not {pkg}")
    lib_dir = toolchain.lib_dir.resolve()
    foreign = [p for p in _mapped_libraries() if p.name.startswith(("libllama.", "libggml"))
               and p.resolve().parent != lib_dir]
    if foreign:
        raise LlamaBuildError(f"llama_cpp loaded libraries from outside {lib_dir}: {foreign}")
    return loaded
