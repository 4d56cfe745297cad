"""Start, watch and stop the embedded Triton Inference Server from the `nvidia-pytriton` wheel.

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
`model.py` prints) go to `log_file`; errors raised here end with the tail of that log.

Life cycle of a served variant (explicit model control, `version_policy: { latest { num_versions: 1 } }`):
`roll_out` asks a running Triton to load the newest version folder of a model, checks that version is READY
(Triton keeps serving the old one until then, and keeps it when the new one fails to load), waits until the
old versions are unloaded and deletes their folders. `dyngate build --triton-url` and `dyngate reload` use it.
`Supervisor` (behind `dyngate serve`) restarts a Triton process that died, a bounded number of times.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from dyngate_build.errors import ConfigError, ServingError
from dyngate_build.repository import list_models, remove_versions, version_numbers

PYTHON_BACKEND = "python"
STUB_NAME = "triton_python_backend_stub"
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
LOG_TAIL_LINES = 40
_POLL_S = 0.1
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # our own server: never via a proxy


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
    """dyngate's cache folder: `$DYNGATE_CACHE_DIR`, else `$XDG_CACHE_HOME/dyngate`, else `~/.cache/dyngate`."""
    if os.environ.get("DYNGATE_CACHE_DIR"):
        return Path(os.environ["DYNGATE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dyngate"


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


# ---------------------------------------------------------------------------------------------- ports

def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (a port in TIME_WAIT counts as free, as it does for Triton)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; another process may take it before you do)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports, e.g. `http, grpc, metrics = free_ports(3)`."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ----------------------------------------------------------------------------------------------- server

@dataclass
class TritonServerConfig:
    """How to run the embedded Triton.

    repository: the model repository (`--model-repository`).
    http_port, grpc_port, metrics_port: distinct TCP ports on `host` (127.0.0.1: this machine only).
    models: names to load at start; None loads every python-backend model in the repository, [] none.
    log_file: where the server's output goes; None: a new file under the system temp folder.
    startup_timeout_s: how long start() waits for the server and its models to be ready.
    strict: raise when a model in `models` fails to load (False: serve the others, see `model_errors()`).
    log_verbose: Triton's `--log-verbose` level (0 off, 1 some, 2+ a lot).
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
        if self.models is not None:
            self.models = list(self.models)


class TritonServer:
    """One embedded `tritonserver` process; a context manager (start on enter, stop on exit).

    `start()` returns once the server answers ready and every model it was asked to load is READY; it raises
    `ServingError` (with the tail of the log) when a port is busy, the process exits, or the timeout passes.
    `stop()` sends SIGTERM (Triton unloads its models, the python stubs exit) and SIGKILLs the whole process
    group after `timeout_s`, so no `triton_python_backend_stub` outlives the server.
    """

    def __init__(self, config: TritonServerConfig):
        self.config = config
        self._process: subprocess.Popen | None = None
        self._log_handle = None
        self.log_path: Path | None = config.log_file
        self._requested: list[str] = []

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
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the server answers ready and the requested models are READY (or raise ServingError)."""
        timeout_s = self.config.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.is_alive():
                raise self._died()
            try:
                status, _ = self._request("GET", "/v2/health/ready", timeout_s=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServingError(f"Triton did not become ready within {timeout_s:.0f} s (startup_timeout_s)."
                                   + self._tail())
            time.sleep(_POLL_S)
        errors = {m: e for m, e in self.model_errors().items() if m in self._requested}
        if errors and self.config.strict:
            lines = "\n".join(f"  {m}: {e}" for m, e in errors.items())
            raise ServingError(f"Triton started but {len(errors)} model(s) failed to load:\n{lines}" + self._tail())

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL the process group; idempotent."""
        process = self._process
        if process is not None:
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

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- state

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def endpoints(self) -> dict[str, str]:
        """URLs: http ("http://host:port"), grpc ("grpc://host:port"; tritonclient wants "host:port") and
        metrics (Prometheus text at "http://host:port/metrics")."""
        h = self.config.host
        return {"http": f"http://{h}:{self.config.http_port}", "grpc": f"grpc://{h}:{self.config.grpc_port}",
                "metrics": f"http://{h}:{self.config.metrics_port}/metrics"}

    def repository_index(self) -> list[dict]:
        """Triton's repository index: [{"name", "version", "state", "reason"}, ...] for every model folder."""
        status, body = self._request("POST", "/v2/repository/index", {})
        if status != 200:
            raise ServingError(f"Triton repository index failed (HTTP {status}): {body}")
        return body

    def ready_models(self) -> list[str]:
        return sorted({m["name"] for m in self.repository_index() if m.get("state") == "READY"})

    def model_errors(self) -> dict[str, str]:
        """Model -> reason, for models Triton tried to load and could not."""
        return {m["name"]: m.get("reason") or m.get("state") for m in self.repository_index()
                if m.get("state") == "UNAVAILABLE" and m.get("reason") and m["reason"] != "unloaded"}

    def load_model(self, name: str) -> None:
        """Load (or reload) one model of the repository; ServingError with Triton's reason when it fails."""
        status, body = self._request("POST", f"/v2/repository/models/{name}/load", {})
        if status != 200:
            known = ", ".join(repository_models(self.config.repository)) or "none"
            raise ServingError(f"Triton could not load model {name!r}: {_error_text(body)} (repository holds: "
                               f"{known})")

    def unload_model(self, name: str) -> None:
        status, body = self._request("POST", f"/v2/repository/models/{name}/unload", {})
        if status != 200:
            raise ServingError(f"Triton could not unload model {name!r}: {_error_text(body)}")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

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
            "--exit-timeout-secs=10",
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

    def _request(self, method: str, path: str, payload: dict | None = None, timeout_s: float = 30):
        return _http_json(method, f"http://{self.config.host}:{self.config.http_port}{path}", payload, timeout_s)

    def _died(self) -> ServingError:
        code = self._process.returncode if self._process is not None else None
        tail = self.log_tail()
        if "already in use" in tail or "Address already in use" in tail:
            return ServingError(f"Triton could not bind its ports {self._ports()} on {self.config.host}: a port "
                                "is already in use; choose other ports." + self._tail())
        return ServingError(f"Triton exited during start-up (exit code {code})." + self._tail())

    def _tail(self) -> str:
        tail = self.log_tail()
        return f"\nLast lines of {self.log_path}:\n{tail}" if tail else ""


def _http_json(method: str, url: str, payload: dict | None = None, timeout_s: float = 30):
    """(HTTP status, parsed JSON body or text) of one request to Triton; OSError when it cannot be reached."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with _DIRECT.open(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def _error_text(body) -> str:
    return body.get("error", str(body)) if isinstance(body, dict) else str(body)


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


# ---------------------------------------------------------------------------------------- model control

ROLL_OUT_SETTLE_S = 120.0  # how long roll_out waits for Triton to finish unloading the old versions
_ACTIVE = ("READY", "LOADING", "UNLOADING")


class ModelControl:
    """Triton's HTTP repository and model-control API (`/v2/repository/...`) of a server started anywhere.

    url: Triton's HTTP endpoint, "http://host:port" or "host:port" (the server must run with
    `--model-control-mode=explicit`, as `dyngate serve` does). timeout_s: per request, in seconds; a load
    answers only once the model is ready or has failed, so keep it long.
    """

    def __init__(self, url: str, timeout_s: float = 600):
        address = url if "://" in url else f"http://{url}"
        if not address.startswith("http://"):
            raise ConfigError(f"triton url={url!r}: model control goes through Triton's HTTP endpoint; give "
                              "http://host:port (e.g. http://127.0.0.1:8000), not the gRPC one")
        self.url, self.timeout_s = address.rstrip("/"), timeout_s

    def request(self, method: str, path: str, payload: dict | None = None, timeout_s: float | None = None):
        """(status, body) of one request; ServingError when Triton cannot be reached."""
        try:
            return _http_json(method, self.url + path, payload, timeout_s or self.timeout_s)
        except OSError as e:
            raise ServingError(f"Triton at {self.url} is not reachable: {e}; start it (`dyngate serve`) or give "
                               "the right --triton-url") from e

    def index(self) -> list[dict]:
        """Triton's repository index: one entry per model version it knows ({"name", "version", "state",
        "reason"}), plus one bare {"name"} per model folder it never loaded."""
        status, body = self.request("POST", "/v2/repository/index", {}, timeout_s=30)
        if status != 200:
            raise ServingError(f"Triton at {self.url}: repository index failed (HTTP {status}): {_error_text(body)}")
        return body or []

    def versions(self, name: str) -> dict[int, dict]:
        """Version -> its index entry, for the versions of `name` Triton knows."""
        return {int(m["version"]): m for m in self.index() if m.get("name") == name and m.get("version")}

    def ready_models(self) -> set[str]:
        """Names of the models with a READY version."""
        return {m["name"] for m in self.index() if m.get("state") == "READY"}

    def load(self, name: str) -> None:
        """Load (or reload: newest version in, old out once it is ready) one model; ServingError with Triton's
        reason when it fails (Triton then keeps serving the versions it had)."""
        status, body = self.request("POST", f"/v2/repository/models/{name}/load", {})
        if status != 200:
            raise ServingError(f"Triton at {self.url} could not load {name!r}: {short_reason(_error_text(body))}")


def short_reason(reason: str, limit: int = 400) -> str:
    """Triton's load-failure reason without the python traceback it appends ("\n\nAt:\n  ..."), one line."""
    text = str(reason or "").split("\n\nAt:")[0].strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class RollOut:
    """What `roll_out` did: the version Triton now serves and the old version folders deleted."""

    name: str
    version: int
    removed: list[int]


def roll_out(control: ModelControl, folder: Path, log=print, settle_s: float = ROLL_OUT_SETTLE_S) -> RollOut:
    """Make Triton serve the newest version folder of the model folder `folder`, then delete the older ones.

    Triton (explicit model control, `latest { num_versions: 1 }`) loads the newest version and unloads the old
    one only once the new one is READY, so requests never find the model missing. The old version folders are
    deleted once the index shows them neither READY, LOADING nor UNLOADING; if that takes longer than
    `settle_s` seconds they stay on disk (logged) for the next roll-out.

    Raises ServingError naming the version and Triton's reason when the new version does not load; Triton then
    still serves what it served before and nothing is deleted.
    """
    folder = Path(folder)
    name = folder.name
    on_disk = version_numbers(folder)
    if not on_disk:
        raise ServingError(f"{folder} has no version folder to load; run `dyngate build` first")
    newest, older = on_disk[-1], on_disk[:-1]
    try:
        control.load(name)
    except ServingError as e:
        served = sorted(v for v, m in control.versions(name).items() if m.get("state") == "READY")
        keeps = f"it keeps serving version {served[-1]}" if served else "it serves no version of it"
        raise ServingError(f"Triton refused version {newest} of {name}: {e}; {keeps}") from e
    state = control.versions(name).get(newest, {})
    if state.get("state") != "READY":
        raise ServingError(f"Triton loaded {name} but version {newest} is {state.get('state') or 'unknown'}: "
                           f"{short_reason(state.get('reason', ''))}")
    log(f"  {name}: Triton serves version {newest}")
    deadline = time.monotonic() + settle_s
    while True:
        versions = control.versions(name)
        busy = [v for v in older if versions.get(v, {}).get("state") in _ACTIVE]
        if not busy:
            break
        if time.monotonic() > deadline:
            log(f"  {name}: Triton still holds version(s) {busy} after {settle_s:.0f} s; their folders stay "
                "until the next roll-out")
            older = [v for v in older if v not in busy]
            break
        time.sleep(_POLL_S)
    removed = remove_versions(folder, older)
    if removed:
        log(f"  {name}: removed old version folder(s) {', '.join(map(str, removed))}")
    return RollOut(name, newest, removed)


# ---------------------------------------------------------------------------------------------- supervision

class Supervisor:
    """Keeps one embedded Triton serving: when its process dies, restart it (bounded), else give up loudly.

    max_restarts: restarts allowed within any `window_s` seconds; one more death in that window raises
    ServingError. Every death is reported on `out` with the exit code and the tail of the log; a restart
    appends to the same log file and loads the models that were ready before the death (re-read every
    `poll_s` seconds), or the configured ones. `run()` blocks until `stop()` (any thread), Ctrl-C, or giving up.
    """

    def __init__(self, config: TritonServerConfig, max_restarts: int = 3, window_s: float = 300.0, out=None,
                 poll_s: float = 2.0):
        if max_restarts < 0:
            raise ConfigError(f"max_restarts={max_restarts} must be ≥0 (0: never restart)")
        if window_s <= 0:
            raise ConfigError(f"restart window_s={window_s} must be > 0 seconds")
        self.config, self.max_restarts, self.window_s, self.poll_s = config, max_restarts, window_s, poll_s
        self.out = out or sys.stdout
        self.server = TritonServer(replace(config))  # its own copy: a restart changes `models`
        self.restarts = 0
        self._deaths: list[float] = []
        self._loaded: list[str] | None = None
        self._stop = threading.Event()

    def run(self) -> None:
        """Start Triton (a start-up failure raises at once), then `watch()` it."""
        self.start()
        self.watch()

    def watch(self) -> None:
        """Wait on the started server and restart it when it dies, until stopped; stops the server on return."""
        try:
            while not self._stop.is_set():
                code = self._wait_for_exit()
                if code is None:
                    return
                self._died(f"Triton {self.server.pid} exited on its own (exit code {code})")
                while not self._stop.is_set():
                    try:
                        self.start(append_log=True)
                        self.restarts += 1
                        break
                    except ServingError as e:
                        self._died(f"restarting Triton failed: {e}", with_log=False)  # e has the log tail
        finally:
            self.server.stop()

    def stop(self) -> None:
        """Ask `run()` to return; it stops the server."""
        self._stop.set()

    def start(self, append_log: bool = False) -> None:
        """Start the server (after a death: with the models that were ready before it) and say so on `out`.

        Raises ServingError (with the log tail) when it does not come up.
        """
        if self._loaded is not None:
            known = repository_models(self.config.repository)
            self.server.config.models = [m for m in self._loaded if m in known]
        started = time.monotonic()
        self.server.start(append_log=append_log)
        print(f"Triton {self.server.pid} ready in {time.monotonic() - started:.1f} s (log: {self.server.log_path})",
              file=self.out, flush=True)
        self._loaded = self.server.ready_models()

    def _wait_for_exit(self) -> int | None:
        """The exit code once the process dies; None when stop() was called first."""
        process = self.server._process
        while not self._stop.is_set():
            try:
                return process.wait(self.poll_s)
            except subprocess.TimeoutExpired:
                pass
            try:
                self._loaded = self.server.ready_models()
            except (ServingError, OSError):
                pass  # busy or dying: keep the last answer
        return None

    def _died(self, what: str, with_log: bool = True) -> None:
        """Count one death; raise ServingError past the budget, else report it and pause before the restart."""
        tail = self.server.log_tail() if with_log else ""
        self.server.stop()  # reap the stubs of the dead server and close its log
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t <= self.window_s] + [now]
        log = f"\nLast lines of {self.server.log_path}:\n{tail}" if tail else ""
        if len(self._deaths) > self.max_restarts:
            raise ServingError(f"{what}; it died {len(self._deaths)} times within {self.window_s:.0f} s, more than "
                               f"the {self.max_restarts} restart(s) allowed (--max-restarts / --restart-window): "
                               f"giving up. Look at the log for the cause." + log)
        print(f"{what}; restarting it ({len(self._deaths)}/{self.max_restarts} within {self.window_s:.0f} s)"
              + log, file=self.out, flush=True)
        time.sleep(min(0.5 * len(self._deaths), 5.0))  # let the ports and shared memory go


# -------------------------------------------------------------------------------------------------- CLI

def serve_forever(config: TritonServerConfig, out=None, max_restarts: int = 3, restart_window_s: float = 300.0) -> None:
    """Start Triton, print its endpoints and models, serve until Ctrl-C or SIGTERM, then stop it cleanly.

    A Triton process that dies on its own is restarted (`Supervisor`): at most `max_restarts` times within
    `restart_window_s` seconds. Raises ServingError when the server cannot start, or dies once more than that.
    """
    out = out or sys.stdout
    supervisor = Supervisor(config, max_restarts, restart_window_s, out)
    server = supervisor.server

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        supervisor.start()
        for name, url in server.endpoints.items():
            print(f"  {name:8s} {url}", file=out)
        ready = server.ready_models()
        print(f"  models   {', '.join(ready) if ready else 'none: run `dyngate build` first, or name them with --models'}", file=out)
        for name, reason in server.model_errors().items():
            print(f"  FAILED   {name}: {short_reason(reason)}", file=out)
        print(f"Ctrl-C stops the server; if it dies it is restarted (at most {max_restarts} times within "
              f"{restart_window_s:.0f} s).", file=out, flush=True)
        supervisor.watch()
    except KeyboardInterrupt:
        print("stopping Triton ...", file=out, flush=True)
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
