"""Start and stop the embedded Triton Inference Server from the `nvidia-pytriton` wheel.

The wheel ships a real `tritonserver` binary (2.51), its shared libraries (`nvidia_pytriton.libs`), the python
backend (`libtriton_python.so`, `triton_python_backend_utils.py`) and one backend stub per Python version. We
assemble a backend directory of our own in a cache folder (symlinks, nothing is written into site-packages),
point `--backend-directory` at it and give the server `PYTHONPATH` = this environment's site-packages, so a
`model.py` imports onnxruntime, torch, tokenizers and PIL from the same virtual environment as dyngate.

Only the python backend is in the wheel. A repository may also hold native-flavour models
(`<model>__<variant>__native`, platform onnxruntime_onnx / pytorch_libtorch) for NVIDIA's container, so the
server runs with `--model-control-mode=explicit` and loads the python-backend models it finds (or the names
the user lists).

    config = TritonServerConfig(Path("model_repository"), http_port=8000)
    with TritonServer(config) as server:      # start() + wait until the server and its models are ready
        print(server.endpoints["grpc"], server.ready_models())

The server listens on 127.0.0.1 unless `host` says otherwise. Its stdout and stderr (including what a
`model.py` prints) go to `log_file`; errors raised here end with the tail of that log. Without a `log_file` the log
is a temporary file: removed when `stop()` ends a server that ran, kept (errors name it) when Triton failed to
start or exited on its own. Readiness, the repository index and model control go through
`dyngate_serving.client.TritonClient` on the gRPC endpoint.
Keeping a server alive is `dyngate_serving.supervisor`; moving a running server to new versions is
`dyngate_serving.rollout`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from dyngate_build.errors import ConfigError, ServingError, TritonUnreachable
from dyngate_build.repository import list_models
from dyngate_serving.client import TritonClient
from dyngate_serving.net import port_is_free

PYTHON_BACKEND = "python"
STUB_NAME = "triton_python_backend_stub"
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
LOG_TAIL_LINES = 40
# What Triton logs on every start on a machine without an NVIDIA GPU or driver ("Error: Failed to initialize NVML",
# "DCGM unable to start"): harmless (DESIGN.md), so log tails shown to people leave these lines out lest they read
# as the cause of a failure.
NO_GPU_LOG_LINES = ("Failed to initialize NVML", "DCGM unable to start")
_POLL_S = 0.1


# --------------------------------------------------------------------------------------------- the wheel

def pytriton_dist() -> Path:
    """The `pytriton/tritonserver` folder of the installed `nvidia-pytriton` wheel."""
    try:
        import pytriton
    except ImportError as e:
        raise ServingError("the embedded Triton needs the nvidia-pytriton wheel: pip install nvidia-pytriton") from e
    dist = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise ServingError(f"no tritonserver binary under {dist}; reinstall nvidia-pytriton (Linux x86_64 wheel)")
    return dist


def server_binary() -> Path:
    """Path of the `tritonserver` executable inside the wheel."""
    return pytriton_dist() / "bin" / "tritonserver"


def server_libs() -> Path:
    """The folder of shared libraries the binary, the python backend and the stub link against."""
    return pytriton_dist().parent.parent / "nvidia_pytriton.libs"


def cache_dir() -> Path:
    """dyngate's cache folder, the one `dyngate build --cache-dir` defaults to: `$DYNGATE_CACHE`, else `.cache`
    (absolute: Triton gets it as a flag)."""
    return Path(os.environ.get("DYNGATE_CACHE") or ".cache").resolve()


def backend_directory(root: Path | None = None) -> Path:
    """A `--backend-directory` holding `python/` = the wheel's python backend plus the stub for this Python.

    Built once per (wheel location, Python version) under `root` (default: `cache_dir()/triton`), as symlinks
    into the wheel; rebuilt when a link is broken (e.g. the virtual environment was recreated).
    """
    dist = pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise ServingError(f"nvidia-pytriton has no python backend stub for Python {version} (it has: "
                           f"{', '.join(have)}); run dyngate with one of those Python versions")
    if stub_needs_numpy1():
        import numpy

        raise ServingError(f"the python backend stub of nvidia-pytriton cannot exchange tensors with numpy "
                           f"{numpy.__version__} (its pybind11 predates numpy 2: inputs arrive corrupted or the "
                           "stub crashes); install numpy<2 in this environment (nvidia-pytriton 0.7 requires it)")
    sources = {name: dist / "backends" / PYTHON_BACKEND / name for name in BACKEND_FILES}
    sources[STUB_NAME] = stub
    tag = hashlib.sha1(str(dist).encode()).hexdigest()[:10]  # one folder per wheel: venvs may share a cache
    target = (root or cache_dir() / "triton") / f"backends-py{version}-{tag}"
    folder = target / PYTHON_BACKEND
    if all((folder / name).resolve() == src.resolve() and (folder / name).exists() for name, src in sources.items()):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    (scratch / PYTHON_BACKEND).mkdir()
    for name, src in sources.items():
        (scratch / PYTHON_BACKEND / name).symlink_to(src)
    _replace_dir(scratch, target)
    return target


def stub_needs_numpy1() -> bool:
    """True when the wheel's stub cannot exchange tensors with the installed numpy.

    The stubs of nvidia-pytriton 0.5.x-0.7.0 are built with a pybind11 that predates numpy 2 (it reads numpy 1's
    dtype struct): under numpy 2 every input tensor arrives as its first byte repeated (0.5.7) or the stub
    crashes (0.7.0). A stub built for numpy 2 names `numpy._core`; ours do not.
    """
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return False
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = pytriton_dist() / "python_backend_stubs" / version / STUB_NAME
    return b"numpy._core" not in stub.read_bytes()


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing an old `target`; another process doing the same at once is fine."""
    import shutil

    if target.exists():
        old = target.with_name(target.name + f".old-{os.getpid()}")
        try:
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    try:
        new.rename(target)
    except OSError:  # someone else created it first: theirs is as good as ours
        shutil.rmtree(new, ignore_errors=True)


# ----------------------------------------------------------------------------------------- the repository

def repository_models(repository: Path) -> dict[str, str]:
    """Model name -> its backend ("python") or platform ("onnxruntime_onnx", ...) for every model folder."""
    repository = Path(repository)
    if not repository.is_dir():
        raise ConfigError(f"repository={str(repository)!r} is not a directory; run `dyngate build` first or "
                          "pass the folder that holds the model folders")
    return {entry.name: entry.backend for entry in list_models(repository)}


# ----------------------------------------------------------------------------------------------- server

@dataclass
class TritonServerConfig:
    """How to run the embedded Triton.

    repository: the model repository (`--model-repository`).
    http_port, grpc_port, metrics_port: distinct TCP ports on `host` (127.0.0.1: this machine only).
    models: names to load at start; None loads every python-backend model in the repository, [] none.
    log_file: where the server's output goes, kept; None: a new file under the system temp folder, removed after
        a clean stop and kept when Triton failed (see `TritonServer`).
    startup_timeout_s: how long start() waits for the server and its models to be ready.
    strict: raise when a model in `models` fails to load (False: serve the others, see `model_errors()`).
    log_verbose: Triton's `--log-verbose` level (0 off, 1 some, 2+ a lot).
    exit_timeout_s: Triton's `--exit-timeout-secs`, whole seconds ≥ 0: on SIGTERM it serves what is in flight (and
        the requests of HTTP connections already open) up to this long, waits for open HTTP connections to close,
        then unloads the models within what is left; past it, it exits anyway. An idle keep-alive HTTP client (the
        gateway with --triton-http) holds its connection open, so a stop then takes the whole timeout (Triton 2.51;
        gRPC connections are not waited for). `scripts/bench_serve_stop.py`, `dyngate serve` of two distilbert-tiny
        variants, SIGTERM to exit, idle: 10.9-11.1 s at 10 s with an idle HTTP client, 5.9-6.0 s at 5 s; 2.8-3.1
        s with a gRPC client or none either way (Triton unloading the models). Our requests take milliseconds: 5 s
        lets them finish.
    """

    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    models: list[str] | None = None
    log_file: Path | None = None
    startup_timeout_s: float = 120
    strict: bool = True
    log_verbose: int = 0
    exit_timeout_s: int = 5
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.repository = Path(self.repository)
        if self.log_file is not None:
            self.log_file = Path(self.log_file)
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        for name, port in ports.items():
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ConfigError(f"{name}={port!r} is not a TCP port; use an integer in [1, 65535]")
        if len(set(ports.values())) != 3:
            raise ConfigError(f"http_port, grpc_port and metrics_port must differ; got {ports}")
        if self.startup_timeout_s <= 0:
            raise ConfigError(f"startup_timeout_s={self.startup_timeout_s!r} must be > 0")
        if isinstance(self.exit_timeout_s, bool) or not isinstance(self.exit_timeout_s, int) or self.exit_timeout_s < 0:
            raise ConfigError(f"exit_timeout_s={self.exit_timeout_s!r} must be whole seconds ≥ 0 (Triton's "
                              "--exit-timeout-secs: how long a stop lets in-flight requests finish), e.g. 5")
        if self.models is not None:
            self.models = list(self.models)


class TritonServer:
    """One embedded `tritonserver` process; a context manager (start on enter, stop on exit).

    `start()` returns once the server answers ready and every model it was asked to load is READY; it raises
    `ServingError` (with the tail of the log) when a port is busy, the process exits, or the timeout passes.
    `stop()` sends SIGTERM (Triton unloads its models, the python stubs exit) and SIGKILLs the whole process
    group after `timeout_s`, so no `triton_python_backend_stub` outlives the server. A temporary log (no
    `config.log_file`) is removed by `stop()` unless the server failed: `start()` raised ServingError, or the
    process had exited on its own before `stop()`; once failed, it is kept (a restart appends to it).
    """

    def __init__(self, config: TritonServerConfig):
        self.config = config
        self._process: subprocess.Popen | None = None
        self._log_handle = None
        self.log_path: Path | None = config.log_file
        self._requested: list[str] = []
        self._stopping = False  # stop() has been called since the last start(): an exit is ours, not a failure
        self._keep_log = False  # Triton failed once: its log is kept even if it is a temporary one

    # ---- life cycle

    def start(self, append_log: bool = False) -> "TritonServer":
        """Start the server and wait until it and its models are ready (see the class docstring).

        append_log: add to the log file instead of truncating it (a restart keeps the log of the run before).
        """
        if self.is_alive():
            raise ServingError(f"this Triton server is already running (pid {self.pid}); stop() it first")
        c = self.config
        known = repository_models(c.repository)
        models = [m for m, kind in known.items() if kind == PYTHON_BACKEND] if c.models is None else c.models
        missing = [m for m in models if m not in known]
        if missing:
            raise ServingError(f"models {missing} are not in {c.repository}; it holds: {', '.join(known) or 'none'}")
        busy = [f"{name} port {port}" for name, port in self._ports().items() if not port_is_free(port, c.host)]
        if busy:
            raise ServingError(f"cannot start Triton: {', '.join(busy)} on {c.host} already in use; stop what "
                               "listens there or choose other ports (--http-port/--grpc-port/--metrics-port)")
        self._requested = list(models)
        command = self.command(models)
        self._stopping = False
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"dyngate-triton-{c.http_port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_path, "ab" if append_log else "wb")
        self._process = subprocess.Popen(
            command, env=self.environment(), stdin=subprocess.DEVNULL, stdout=self._log_handle,
            stderr=subprocess.STDOUT, start_new_session=True,  # own process group: stop() can reap the stubs
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None)
        try:
            self.wait_ready(c.startup_timeout_s)
        except BaseException as e:
            self._keep_log |= isinstance(e, ServingError)  # its message names the log: keep it (not for a Ctrl-C)
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the server answers ready on gRPC and HTTP and the requested models are READY (or raise
        ServingError)."""
        timeout_s = self.config.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.is_alive():
                raise self._died()
            if all(self._answers_ready(protocol) for protocol in ("grpc", "http")):
                break
            if time.monotonic() > deadline:
                raise ServingError(f"Triton did not become ready within {timeout_s:.0f} s (startup_timeout_s)."
                                   + self._tail())
            time.sleep(_POLL_S)
        errors = {m: e for m, e in self.model_errors().items() if m in self._requested}
        if errors and self.config.strict:
            lines = "\n".join(f"  {m}: {e}" for m, e in errors.items())
            raise ServingError(f"Triton started but {len(errors)} model(s) failed to load:\n{lines}" + self._tail())

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM, wait up to `timeout_s` (default: Triton's exit timeout + 20 s to unload and exit), then SIGKILL
        the process group; remove a temporary log unless Triton failed (see the class docstring); idempotent."""
        timeout_s = self.config.exit_timeout_s + 20 if timeout_s is None else timeout_s
        process = self._process
        if process is not None:
            if process.poll() is not None and not self._stopping:
                self._keep_log = True  # it exited on its own: the log says why
            self._stopping = True
            pgid = process.pid  # session leader: its pid is the group id the stubs inherited
            if process.poll() is None:
                try:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
                except KeyboardInterrupt:  # a second Ctrl-C: do not wait any longer
                    pass
            _kill_group(pgid)
            if process.poll() is None:
                process.wait(5)
            _remove_shared_memory(process.args)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self.removes_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- state

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def removes_log(self) -> bool:
        """Whether `stop()` will remove the log: a temporary one (no `config.log_file`) of a server that has not
        failed (see the class docstring)."""
        return self.config.log_file is None and not self._keep_log

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def endpoints(self) -> dict[str, str]:
        """URLs: http ("http://host:port"), grpc ("grpc://host:port"; tritonclient wants "host:port") and
        metrics (Prometheus text at "http://host:port/metrics")."""
        h = self.config.host
        return {"http": f"http://{h}:{self.config.http_port}", "grpc": f"grpc://{h}:{self.config.grpc_port}",
                "metrics": f"http://{h}:{self.config.metrics_port}/metrics"}

    def client(self, timeout_s: float = 30) -> TritonClient:
        """A new `TritonClient` on this server's gRPC endpoint (one per thread; close it, or use `with`)."""
        return TritonClient(self.endpoints["grpc"], timeout_s=timeout_s)

    def repository_index(self) -> list[dict]:
        """Triton's repository index: [{"name", "version", "state", "reason"}, ...] for every model folder."""
        with self.client() as client:
            return client.index()

    def ready_models(self) -> list[str]:
        with self.client() as client:
            return client.ready_models()

    def model_errors(self) -> dict[str, str]:
        """Model -> reason, for models Triton tried to load and could not."""
        with self.client() as client:
            return client.model_errors()

    def load_model(self, name: str) -> None:
        """Load (or reload) one model of the repository over gRPC; ServingError with Triton's reason when it
        fails (naming the models the repository holds)."""
        with self.client() as client:
            try:
                client.load(name)
            except TritonUnreachable:
                raise
            except ServingError as e:
                known = ", ".join(repository_models(self.config.repository)) or "none"
                raise ServingError(f"{e} (repository holds: {known})") from e

    def unload_model(self, name: str) -> None:
        with self.client() as client:
            client.unload(name)

    def stub_instances(self) -> dict[str, str]:
        """Instance name -> model name, for every live `triton_python_backend_stub` of this server.

        Each python-backend model instance is one stub process whose command line names its `model.py`
        (`<repository>/<model>/<version>/model.py`) and its instance (`<model>_<group>_<index>`); a stub
        that died (killed, out of memory) is missing here while Triton still reports its model READY.
        The model-level stub the python backend runs while it loads a model (its instance argument is the model
        name itself: it auto-completes the config and exits, seen here for ~1.3 s per load) is no instance and
        is left out. Empty when the server is not running.
        """
        if not self.is_alive():
            return {}
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return {}
        instances = {}
        for child in children:
            try:
                # the kernel keeps 15 characters of a process name
                if not child.name().startswith(STUB_NAME[:15]) or child.status() == psutil.STATUS_ZOMBIE:
                    continue
                args = child.cmdline()
            except psutil.Error:
                continue  # exited while we looked
            if len(args) > 8 and args[1].endswith("model.py"):
                model = Path(args[1]).parent.parent.name
                if args[8] != model:
                    instances[args[8]] = model
        return instances

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last `lines` lines of the server's log ("" without one), without the NO_GPU_LOG_LINES."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
        kept = [line for line in text.splitlines() if not any(noise in line for noise in NO_GPU_LOG_LINES)]
        return "\n".join(kept[-lines:])

    # ---- how it is run

    def command(self, models: list[str]) -> list[str]:
        c = self.config
        args = [
            str(server_binary()),
            f"--model-repository={c.repository.resolve()}",
            f"--backend-directory={backend_directory()}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in models],
            "--strict-readiness=false",  # ready = server up; start() checks the models itself
            "--exit-on-error=false",  # one broken variant must not take the others down
            f"--exit-timeout-secs={c.exit_timeout_s}",
            f"--http-address={c.host}", f"--http-port={c.http_port}",
            f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.host}", f"--metrics-port={c.metrics_port}",
            "--allow-metrics=true",
            f"--log-verbose={c.log_verbose}",
            # a region prefix of our own: two servers on one machine must not share python-backend shm
            f"--backend-config=python,shm-region-prefix-name=dyngate{os.getpid()}-{os.urandom(3).hex()}-",
        ]
        return args + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(server_libs())]
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):
            # the stub embeds libpython: prefer this interpreter's own over a system one of the same version
            libdir = sysconfig.get_config_var("LIBDIR")
            if libdir and (Path(libdir) / str(sysconfig.get_config_var("LDLIBRARY"))).exists():
                libs.append(libdir)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    # ---- helpers

    def _ports(self) -> dict[str, int]:
        c = self.config
        return {"http": c.http_port, "grpc": c.grpc_port, "metrics": c.metrics_port}

    def _answers_ready(self, protocol: str) -> bool:
        """Whether the endpoint of `protocol` answers ready (Triton opens gRPC before HTTP); a new client each
        time, so a gRPC channel's reconnect back-off never delays the answer."""
        with TritonClient(self.endpoints[protocol], timeout_s=2) as client:
            return client.is_ready()

    def _died(self) -> ServingError:
        code = self._process.returncode if self._process is not None else None
        tail = self.log_tail()
        if "already in use" in tail or "Address already in use" in tail:
            return ServingError(f"Triton could not bind its ports {self._ports()} on {self.config.host}: a port "
                                "is already in use; choose other ports." + self._tail())
        return ServingError(f"Triton exited during start-up (exit code {code})." + self._tail())

    def _tail(self) -> str:
        """The log's last lines for an error, named by its path (kept: see the class docstring)."""
        if self.log_path is None:
            return ""
        tail = self.log_tail()
        return f"\nLast lines of {self.log_path}:\n{tail}" if tail else f"\nTriton's log {self.log_path} is empty."


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """SIGTERM the server when the process that started it dies (the thread that forked: main thread only)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _remove_shared_memory(args) -> None:
    """Delete the python backend's /dev/shm regions of a server whose processes are all gone (a SIGKILLed
    Triton leaves them behind; a clean exit has removed them already). The prefix is this server's own."""
    flag = "--backend-config=python,shm-region-prefix-name="
    for arg in args if isinstance(args, (list, tuple)) else []:
        prefix = arg[len(flag):] if isinstance(arg, str) and arg.startswith(flag) else ""
        if prefix.startswith("dyngate"):
            for path in Path("/dev/shm").glob(prefix + "*"):
                try:
                    path.unlink()
                except OSError:
                    pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
