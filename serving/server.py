"""Start, wait for and stop the ``tritonserver`` shipped in the nvidia-pytriton 0.7.0 wheel (server 2.51).

What it takes on a CPU-only machine (see shared/notes/triton-on-cpu.md):
- a backend directory holding the Python backend plus the stub built for the running Python;
- ``LD_LIBRARY_PATH`` with the wheel's bundled libraries, and ``PATH`` starting with this interpreter's
  bin directory, so the stub finds this environment's site-packages (torch, onnxruntime, fire_backend).
The server binds 127.0.0.1 by default, runs in its own process group, and ``stop()`` checks that no
stub process and no shared-memory region of its own is left behind.

Hardening (see the README's "Security model"):
- no model control over the network by default (``--model-control-mode=none``): what a protected name
  serves changes only through its repository directory (the repair model reloads its own file);
- every API but health takes a key (``fire_backend.keys``): the admin key for the model repository,
  shared memory, statistics, logging and trace; the inference key for inference, metadata and model
  config (the gateway holds it and uses it for protected models only), so a local account on the raw
  ports reaches no half and no direction; neither key appears in any process's arguments
  (``server_guard``) or in an environment other users can read;
- the gateway's ``fire-source`` header (the client's address) reaches the models as a request
  parameter, so traffic statistics can bound each source's weight;
- the server and its stubs run with umask 077: their shared-memory regions in /dev/shm are 0600;
- its log is size-capped, kept after a crash, and read from the end (``logs``).
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fire_backend.cache import cache_dir
from fire_backend.errors import FireError
from fire_backend.keys import ADMIN, INFERENCE, KEYS
from fire_backend.names import (
    BACKEND_DIR_ENV,
    GPU_PROFILE,
    GPU_TORCH_PROFILE,
    GRPC_PORT,
    HTTP_PORT,
    LOOPBACK,
    METRICS_PORT,
    PARENT_ENV,
    PROJECT_ROOT,
    SOURCE_HEADER,
    TRITONSERVER_ENV,
)
from serving import logs, server_guard
from serving.admin import admin_request, http_request
from serving.procfs import group_pids
from serving.watchdog import StubWatchdog

STUB_SHM_BYTES = 16 << 20  # per-stub shared memory: a batch-64 activation fits without growing the pool
STUB_NUMPY_BELOW = 2  # the 2.51 stubs need numpy < 2 (with 2.x, as_numpy of small tensors read wrong values)


CRASHED_GRACE_S = 5.0  # the clean-unload wait when stopping a server one of whose stubs died


class ServerError(FireError):
    """The server could not be found, started, or made ready; ``details`` holds its log's tail."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: pip install nvidia-pytriton==0.7.0")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"{root}/bin/tritonserver not found: reinstall nvidia-pytriton==0.7.0")
    return root


def prepare_backends(dest: Path) -> Path:
    """Copy the Python backend and the stub for this interpreter into ``dest``/python."""
    root = pytriton_root()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"no Python-backend stub for Python {py} in {root}/python_backend_stubs")
    target = dest / "python"
    if not (target / "triton_python_backend_stub").is_file():
        shutil.copytree(root / "backends" / "python", target, dirs_exist_ok=True)
        shutil.copy2(stub, target / "triton_python_backend_stub")
    return dest


NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")  # the Triton image's server


def resolve_server(config: ServerConfig, scratch: Path) -> tuple[Path, Path, bool]:
    """(tritonserver binary, backend directory, whether it is the nvidia-pytriton wheel's server).

    The CPU profile runs the wheel's server (Python backend only). The GPU profile needs a server with
    the TensorRT backend: the one named in the config or $FIRE_TRITONSERVER, else the NGC image's; it
    refuses to start with a clear message when the backend directory has no ``tensorrt``. The gpu_torch
    profile needs only the Python backend: the NGC image's server where there is one, else the wheel's."""
    named = config.tritonserver or os.environ.get(TRITONSERVER_ENV)
    backends = config.backend_dir or os.environ.get(BACKEND_DIR_ENV)
    gpu = config.model_config_name == GPU_PROFILE  # TensorRT halves: a server with that backend
    on_gpu = config.model_config_name in (GPU_PROFILE, GPU_TORCH_PROFILE)
    if named is None and on_gpu and NGC_TRITONSERVER.is_file():  # the Triton image's server, when there
        named = NGC_TRITONSERVER
    if named is None:
        binary, backend_dir, wheel = pytriton_root() / "bin" / "tritonserver", prepare_backends(scratch), True
    else:
        binary, wheel = Path(named), False
        backend_dir = Path(backends) if backends else binary.parent.parent / "backends"
        if not binary.is_file():
            raise ServerError(f"tritonserver not found at {binary}")
    if gpu:
        found = sorted(p.name for p in backend_dir.iterdir() if p.is_dir()) if backend_dir.is_dir() else []
        if not {"tensorrt", "python"} <= set(found):
            raise ServerError(
                f"the GPU profile needs a tritonserver with the TensorRT and Python backends; {backend_dir} has "
                f"{found or 'none'}. Run it in the Triton image (deploy/Dockerfile: /opt/tritonserver), or name "
                "a server with $FIRE_TRITONSERVER and its backends with $FIRE_BACKEND_DIR"
            )
    return binary, backend_dir, wheel


def check_stub_numpy(env: dict[str, str]) -> str:
    """The numpy the Python-backend stubs will import (the ``python3`` first on the server's PATH, with its
    PYTHONPATH); refuses numpy >= 2, which the stubs of this server misread. Returns the version."""
    python = shutil.which("python3", path=env.get("PATH")) or sys.executable
    probe = subprocess.run([python, "-c", "import numpy; print(numpy.__version__)"], env=env, capture_output=True,
                           text=True, timeout=60, check=False)  # fmt: skip
    version = probe.stdout.strip()
    if probe.returncode != 0 or not version:
        raise ServerError(f"the Python-backend stubs cannot import numpy with {python}: "
                          f"{(probe.stderr.strip().splitlines() or ['no output'])[-1]}")  # fmt: skip
    if int(version.split(".")[0]) >= STUB_NUMPY_BELOW:
        raise ServerError(
            f"the Python-backend stubs of tritonserver 2.51 need numpy < {STUB_NUMPY_BELOW}; {python} imports numpy "
            f"{version} (tensors would be read wrong): pip install 'numpy<{STUB_NUMPY_BELOW}' into the environment "
            "the server runs its models in"
        )
    return version


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are picked, so none repeats."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class ServerConfig:
    repository: Path
    host: str = LOOPBACK
    http_port: int = HTTP_PORT  # 0: pick a free port
    grpc_port: int = GRPC_PORT
    metrics_port: int = METRICS_PORT
    model_config_name: str | None = None  # "gpu" selects configs/gpu.pbtxt
    model_control: str = "none"  # or "explicit"
    load_models: list[str] = field(default_factory=list)  # explicit mode: models to load at start
    backend_config: list[str] = field(default_factory=list)  # e.g. "python,shm-default-byte-size=..."
    log_verbose: int = 0
    admin_key: str | None = None  # guards model control/repository; None: a random key per start
    inference_key: str | None = None  # guards inference/metadata/config; None: fire_backend.keys.INFERENCE's
    tls_cert: Path | None = None  # PEM server certificate and key: gRPC over TLS
    tls_key: Path | None = None
    watchdog: bool = False  # explicit mode: reload a model whose Python stub died (see watchdog.py)
    http_host: str | None = None  # HTTP and metrics bind address (None: ``host``); HTTP has no TLS in Triton
    tritonserver: Path | None = None  # None: $FIRE_TRITONSERVER, the NGC image's (GPU profile), or the wheel's
    backend_dir: Path | None = None  # None: $FIRE_BACKEND_DIR, or the backends next to that server
    stub_shm_bytes: int = STUB_SHM_BYTES
    log_dir: Path | None = None  # None: the cache's logs/; logs stay after the server stops or crashes
    log_max_bytes: int = 16 << 20  # per file; two older files are kept
    extra_args: list[str] = field(default_factory=list)


class TritonServer:
    """``with TritonServer(cfg) as server:`` starts, waits until every model has loaded, and stops."""

    def __init__(self, config: ServerConfig):
        if not Path(config.repository).is_dir():
            raise ServerError(f"model repository {config.repository} not found (write one with `fire protect` or "
                              "`fire build-repo`)")  # fmt: skip
        self.config = config
        unset = [a for a in ("http_port", "grpc_port", "metrics_port") if getattr(config, a) == 0]
        for attr, port in zip(unset, free_ports(len(unset), config.host), strict=True):
            setattr(config, attr, port)
        self.shm_prefix = f"fire_{uuid.uuid4().hex[:10]}_"
        self.workdir = Path(tempfile.mkdtemp(prefix="fire-triton-"))
        self.log_dir = Path(config.log_dir) if config.log_dir else cache_dir("logs")
        self.log_path = self.log_dir / f"tritonserver-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.log"
        self.admin_key = config.admin_key or secrets.token_urlsafe(24)
        self.inference_key = config.inference_key or INFERENCE.ensure()[0]
        self.keys = {ADMIN: self.admin_key, INFERENCE: self.inference_key}
        self.log: logs.RotatingLog | None = None
        self._check_ports_free()  # before anything starts: a taken port gets a clear message, not a stuck wait
        self.binary, self.backend_dir, self.wheel = resolve_server(config, self.workdir / "backends")
        self.process: subprocess.Popen | None = None
        self.watchdog = None
        self.leftover_processes: list[int] = []  # what the last stop() found and had to clean up
        self.leftover_shm: list[str] = []

    @property
    def http_host(self) -> str:
        return self.config.http_host or self.config.host

    @property
    def http_url(self) -> str:
        return f"{self.http_host}:{self.config.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.http_host}:{self.config.metrics_port}/metrics"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    def command(self) -> list[str]:
        c = self.config
        cmd = [
            str(self.binary),
            f"--model-repository={Path(c.repository).resolve()}",
            f"--backend-directory={self.backend_dir}",
            f"--http-address={self.http_host}",
            f"--grpc-address={c.host}",
            f"--metrics-address={self.http_host}",
            f"--http-port={c.http_port}",
            f"--grpc-port={c.grpc_port}",
            f"--metrics-port={c.metrics_port}",
            f"--model-control-mode={c.model_control}",
            "--exit-on-error=false",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={c.stub_shm_bytes}",
            f"--backend-config=python,shm-growth-byte-size={c.stub_shm_bytes}",
            f"--log-verbose={c.log_verbose}",
            f"--http-header-forward-pattern=^{SOURCE_HEADER}$",
            f"--grpc-header-forward-pattern=^{SOURCE_HEADER}$",
        ]
        # A key is never an argument (every local user can read /proc/<pid>/cmdline): its placeholder
        # is replaced inside the process by the server_guard preload library.
        for key in KEYS:
            rule = f"{key.categories}:{key.header}={server_guard.placeholder(key)}"
            cmd += [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]
        if c.tls_cert or c.tls_key:
            if not (c.tls_cert and c.tls_key):
                raise ServerError("TLS needs both a certificate and a key")
            cmd += ["--grpc-use-ssl=true", f"--grpc-server-cert={c.tls_cert}", f"--grpc-server-key={c.tls_key}"]
        cmd += [f"--backend-config={b}" for b in c.backend_config]
        if c.model_config_name:
            cmd.append(f"--model-config-name={c.model_config_name}")
        cmd += [f"--load-model={m}" for m in c.load_models]
        return cmd + c.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.wheel:  # the wheel's server finds its libraries (libtritonserver, ...) next to the package
            libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", "1")
        for key, value in self.keys.items():  # readable by this user and root only; the library drops them
            env[key.env] = value
        env["LD_PRELOAD"] = str(server_guard.library())
        env[PARENT_ENV] = str(os.getpid())  # the server goes when this process goes (SIGKILL too)
        return env

    def start(self, timeout: float = 120.0, require_all_models: bool = True) -> TritonServer:
        try:
            cmd, env = self.command(), self.environment()
        except server_guard.ServerGuardError as e:
            raise ServerError(str(e)) from None
        check_stub_numpy(env)
        logs.prune(self.log_dir)
        self.log = logs.RotatingLog(self.log_path, self.config.log_max_bytes)
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True, umask=0o077
        )
        self.log.follow(self.process.stdout)
        try:
            self.wait_ready(timeout, require_all_models)
            self._check_key_is_secret()
            if self.config.watchdog:
                if self.config.model_control != "explicit":
                    raise ServerError("the stub watchdog reloads models: it needs model_control='explicit'")
                models = set(self.python_stub_counts())  # a stub that died before its first look is seen too
                self.watchdog = StubWatchdog(self.process.pid, self.http_url, self.admin_key, models).__enter__()
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, method: str = "GET", timeout: float = 2.0) -> tuple[int, bytes]:
        return admin_request(self.http_url, self.admin_key, path, method, timeout)

    def headers(self, protocol: str = "grpc") -> dict[str, str]:
        """The inference key's header, for this server's own clients (tests, benchmarks)."""
        return INFERENCE.headers(self.inference_key, protocol)

    def _check_key_is_secret(self) -> None:
        """Fail closed if a placeholder, which anyone can read in the arguments, works as its key."""
        probes = {ADMIN: ("/v2/repository/index", "POST"), INFERENCE: ("/v2", "GET")}
        for key, (path, method) in probes.items():
            status, _ = http_request(self.http_url, path, method, {key.header: server_guard.placeholder(key)}, 5)
            if status != 403:
                raise ServerError(f"the {key.name} key placeholder was accepted: the key-hiding library did not run")

    def model_states(self) -> dict[str, dict]:
        """The repository index: model name -> {state, reason}."""
        status, body = self._get("/v2/repository/index", method="POST")
        index = json.loads(body or b"[]")
        if status != 200 or not isinstance(index, list):
            raise ServerError(f"the server on {self.http_url} refused its own admin key (HTTP {status}): is another "
                              "server answering on that port?")  # fmt: skip
        return {m["name"]: m for m in index}

    def python_stub_counts(self, deadline_s: float = 10.0) -> dict[str, int]:
        """Loaded Python-backend model -> the stub processes its instances run, as the server parsed its
        config (one per instance: ``count``, times the GPUs listed for KIND_GPU). Raises ServerError when
        the server does not answer within ``deadline_s`` in all."""
        deadline = time.monotonic() + deadline_s
        try:
            states = self.model_states()
            counts = {}
            for name, m in states.items():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer within {deadline_s:.0f} s")
                if m.get("state") != "READY":
                    continue
                path = f"/v2/models/{urllib.parse.quote(name, safe='')}/config"
                status, body = http_request(self.http_url, path, "GET", self.headers("http"), min(5.0, left))
                config = json.loads(body) if status == 200 else {}
                if isinstance(config, dict) and config.get("backend") == "python":
                    groups = config.get("instance_group") or [{}]
                    counts[name] = sum(max(1, int(g.get("count", 1))) * (max(1, len(g.get("gpus") or []))
                                       if g.get("kind") == "KIND_GPU" else 1) for g in groups)  # fmt: skip
            return counts
        except (OSError, ValueError, TypeError, AttributeError, http.client.HTTPException) as e:
            raise ServerError(f"reading the models' configs from {self.http_url} failed: {e}") from None

    def _check_ports_free(self) -> None:
        c = self.config
        for what, host, port in (("HTTP", self.http_host, c.http_port), ("gRPC", c.host, c.grpc_port),
                                 ("metrics", self.http_host, c.metrics_port)):  # fmt: skip
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no owner
                try:
                    s.bind((host, port))
                except OSError as e:
                    raise ServerError(f"{what} port {host}:{port} is in use ({e.strerror}): stop what holds it, or "
                                      "choose another port") from None  # fmt: skip

    def wait_ready(self, timeout: float, require_all_models: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(f"tritonserver exited during start-up (code {self.process.returncode}); "
                                  f"log: {self.log_path}", self.log_tail())  # fmt: skip
            try:
                status, _ = self._get("/v2/health/live")
                if status == 200:  # live comes after the start-up loads; a model may still be (re)loading
                    states = self.model_states()
                    if self.config.model_control == "explicit" and "*" not in self.config.load_models:
                        states = {n: m for n, m in states.items() if n in self.config.load_models}
                    if not any(m.get("state") in ("LOADING", "UNLOADING") for m in states.values()):
                        # no state at all: never loaded, e.g. an ensemble whose step failed to load
                        failed = {
                            n: m.get("reason") or "not loaded (a model it depends on failed?)"
                            for n, m in states.items()
                            if m.get("state") != "READY"
                        }
                        if not require_all_models:
                            return
                        if failed:
                            reasons = "; ".join(f"{n}: {' '.join(str(r).split())}" for n, r in failed.items())
                            raise ServerError(f"models failed to load: {reasons} (log: {self.log_path})",
                                              self.log_tail())  # fmt: skip
                        if self._get("/v2/health/ready")[0] == 200:
                            return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s (log: {self.log_path})", self.log_tail())

    def log_tail(self, lines: int = 40) -> str:
        return logs.tail(self.log_path, lines)

    def shm_regions(self) -> list[str]:
        """This server's shared-memory regions in /dev/shm."""
        shm = Path("/dev/shm")
        return sorted(p.name for p in shm.iterdir() if p.name.startswith(self.shm_prefix)) if shm.is_dir() else []

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait for a clean unload, then SIGKILL whatever is left of the process group. After a stub
        crash the grace is ``CRASHED_GRACE_S``: an instance whose stub died never finishes unloading (2.51),
        and the server would wait its whole exit timeout for it."""
        if self.watchdog is not None:  # first: stubs exiting at shutdown are no crash
            self.watchdog.__exit__(None, None, None)
            if self.watchdog.recoveries:
                timeout = min(timeout, CRASHED_GRACE_S)
            self.watchdog = None
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.leftover_processes = [p for p in group_pids(proc.pid) if p != proc.pid]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind by a crash, if any
        proc.wait()
        if self.log is not None:
            self.log.join()
        self.leftover_shm = self.shm_regions()
        for name in self.leftover_shm:  # only after a crash: a clean stop leaves none
            (Path("/dev/shm") / name).unlink(missing_ok=True)
        self.process = None

    def __enter__(self) -> TritonServer:
        return self if self.process else self.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop (``timeout``: the grace for a clean unload) and remove the working directory (the log,
        elsewhere, stays)."""
        self.stop(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()
