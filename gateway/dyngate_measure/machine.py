"""The machine under a measurement: hardware and library versions, NVIDIA GPUs (NVML through pynvml) and the
CPU and memory of a process tree (psutil). Used by `dyngate report`, `dyngate bench` and the gateway's
Metrics tab.

    machine_info()                      # {"cpu", "cores", "threads", "memory_gb", "gpu", "gpus", "os", "python"}
    library_versions(server_version("http://127.0.0.1:8000"))
    gpu_usage()                         # per GPU: utilisation %, memory MB, power W; or "no GPU"
    tree = ProcessTree(pid); tree.sample()        # CPU seconds since the last sample, RSS, children
    with ResourceSampler(pid) as sampler: ...     # sampled in a thread; sampler.result()
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from importlib import metadata as _metadata
from pathlib import Path

import psutil

from dyngate_build.errors import ServingError

LIBRARIES = ("torch", "onnxruntime", "transformers", "tokenizers", "numpy", "tritonclient", "nvidia-pytriton",
             "dyngate")
NO_GPU = "no GPU"


# -------------------------------------------------------------------------------------------------- NVML

@contextlib.contextmanager
def nvml():
    """Yield (pynvml, [device handles]) while NVML is initialised, or None when there is no GPU or driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        yield None
        return
    try:
        count = pynvml.nvmlDeviceGetCount()
        yield (pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]) if count else None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def gpus() -> list[dict]:
    """[{"index", "name", "memory_total_mb" (1e6 bytes)}] of the NVIDIA GPUs pynvml sees; [] without a GPU."""
    with nvml() as found:
        if found is None:
            return []
        pynvml, handles = found
        out = []
        for i, handle in enumerate(handles):
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            out.append({"index": i, "name": name,
                        "memory_total_mb": round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 1e6, 1)})
        return out


def gpu_usage() -> list[dict] | str:
    """Per GPU now: utilisation %, memory used/total MB (2**20 bytes), power W; NO_GPU when there is none."""
    try:
        with nvml() as found:
            if found is None:
                return NO_GPU
            pynvml, handles = found
            out = []
            for i, handle in enumerate(handles):
                util = pynvml.nvmlDeviceGetUtilizationRates(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    power = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000
                except Exception:
                    power = None
                out.append({"gpu": i, "utilization_pct": util.gpu, "memory_used_mb": round(memory.used / 2**20, 1),
                            "memory_total_mb": round(memory.total / 2**20, 1), "power_w": power})
            return out or NO_GPU
    except Exception:
        return NO_GPU


# ----------------------------------------------------------------------------------------- machine, versions

def machine_info() -> dict:
    """CPU model (from /proc/cpuinfo), physical cores, hardware threads, memory, GPUs, OS and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    found = gpus()
    return {"cpu": cpu, "cores": psutil.cpu_count(logical=False) or os.cpu_count(),
            "threads": psutil.cpu_count(logical=True) or os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "gpu": ", ".join(g["name"] for g in found) if found else NO_GPU, "gpus": found,
            "os": platform.platform(), "python": platform.python_version()}


def library_versions(server_version: str | None = None) -> dict:
    """Installed versions of the libraries the variants run on, and the tritonserver binary's own version."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if server_version:
        versions["tritonserver"] = f"{server_version} (nvidia-pytriton {versions['nvidia-pytriton']} wheel)"
    return versions


def server_version(url: str) -> str | None:
    """The running Triton's version from its server metadata; `url` as for TritonClient ("http://host:port"
    or a gRPC address). None when it cannot be read."""
    from dyngate_serving.client import TritonClient

    try:
        with TritonClient(url, timeout_s=5) as client:
            return client.server_metadata().get("version")
    except ServingError:
        return None


# ------------------------------------------------------------------------------------------- process trees

def listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP `port` on this machine, when psutil may see it."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.AccessDenied, PermissionError):
        pass
    for process in psutil.process_iter(["name"]):  # fallback: per-process (own processes are always visible)
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in process.net_connections(kind="tcp")):
                return process.pid
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return None


class ProcessTree:
    """A process and all its descendants (Triton and its python-backend stubs), sampled on demand.

    `sample()` returns (CPU seconds the tree used since the previous sample, summed over its processes; the
    tree's resident memory in bytes; how many descendants it has). Raises psutil.NoSuchProcess once the root
    is gone."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self._cpu_seen: dict[int, float] = {}

    @property
    def pid(self) -> int:
        return self.root.pid

    def is_running(self) -> bool:
        return self.root.is_running()

    def sample(self) -> tuple[float, int, int]:
        children = self.root.children(recursive=True)
        used, rss = 0.0, 0
        for proc in [self.root] + children:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    cpu = times.user + times.system
                    rss += proc.memory_info().rss
            except psutil.Error:
                continue
            previous = self._cpu_seen.get(proc.pid)
            if previous is not None:
                used += max(0.0, cpu - previous)
            self._cpu_seen[proc.pid] = cpu
        return used, rss, len(children)


class ResourceSampler:
    """Samples a process tree (root `pid` and all its descendants) in a thread while in a `with` block.

    cpu_percent: CPU seconds the tree used per wall second × 100 (100 = one core busy); peak_rss_mb: the
    largest sum of resident memory over the tree; GPU utilisation (mean %) and memory (peak MB, all
    processes on the device) through pynvml when a GPU exists."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        self.tree = ProcessTree(pid)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_used = 0.0
        self._started = self._ended = 0.0
        self.peak_rss = 0
        self.samples = 0
        self._gpu_util: list[float] = []
        self._gpu_mem_peak = 0
        self._nvml_context = None
        self._nvml = None

    def _sample(self) -> None:
        try:
            used, rss, _ = self.tree.sample()
        except psutil.Error:
            used, rss = 0.0, 0
        self._cpu_used += used
        self.peak_rss = max(self.peak_rss, rss)
        self.samples += 1
        if self._nvml is not None:
            pynvml, handles = self._nvml
            try:
                self._gpu_util.append(sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles) / len(handles))
                self._gpu_mem_peak = max(self._gpu_mem_peak, sum(pynvml.nvmlDeviceGetMemoryInfo(h).used
                                                                 for h in handles))
            except Exception:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "ResourceSampler":
        self._nvml_context = nvml()
        self._nvml = self._nvml_context.__enter__()
        self._started = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="dyngate-report-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self._ended = time.perf_counter()
        self._nvml_context.__exit__(None, None, None)

    def result(self) -> dict:
        wall = max(self._ended - self._started, 1e-9)
        gpu = NO_GPU if self._nvml is None else {
            "util_percent": round(sum(self._gpu_util) / len(self._gpu_util), 1) if self._gpu_util else None,
            "memory_peak_mb": round(self._gpu_mem_peak / 1e6, 1)}
        return {"cpu_percent": round(100 * self._cpu_used / wall, 1), "peak_rss_mb": round(self.peak_rss / 1e6, 1),
                "seconds": round(wall, 2), "samples": self.samples, "gpu": gpu}
