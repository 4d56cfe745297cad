"""Server metrics for the Metrics tab: Triton's Prometheus text, the server process, the machine, the GPU.

    monitor = MetricsMonitor("http://127.0.0.1:8002/metrics")
    snapshot = monitor.sample()      # parses Triton's metrics, reads psutil and NVML, appends to the history
    snapshot["models"]               # per model: success, failure, inferences, executions, batching ratio, ...
    monitor.history                  # [{"time", "server_cpu", "server_rss_mb", "machine_cpu", "requests_per_s"}]

The server's pid is the one given, else the process listening on the metrics port (psutil). Its memory is
the server's RSS plus its children's (every python-backend model instance is a stub process of its own).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from urllib.parse import urlparse

import psutil

from dyngate_build.errors import ServingError
from dyngate_measure.machine import ProcessTree, gpu_usage, listening_pid
from dyngate_serving.client import parse_address
from dyngate_serving.net import DIRECT

MODEL_HEADERS = ["model", "success", "failure", "inferences", "executions", "batching ratio", "avg queue ms",
                 "avg compute ms"]
HISTORY = 300


def default_metrics_url(triton_url: str) -> str:
    """Triton's metrics url from its gRPC address by Triton's default layout (http p-1, grpc p, metrics p+1);
    the address as `dyngate_serving.client.parse_address` reads it (ConfigError when malformed)."""
    address, protocol = parse_address(triton_url)
    host, _, port = address.rpartition(":")
    return f"http://{host}:{int(port) + (2 if protocol == 'http' else 1)}/metrics"


def fetch_metrics(url: str, timeout_s: float = 2.0) -> str:
    try:
        with DIRECT.open(url, timeout=timeout_s) as response:
            return response.read().decode("utf-8", errors="replace")
    except Exception as e:
        raise ServingError(f"Triton's metrics at {url} are not reachable: {e}") from e


def parse_triton_metrics(text: str) -> dict:
    """Per model: counts and cumulative durations (us) from Triton's Prometheus text; plus the GPU samples."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"nv_inference_request_success": "success", "nv_inference_request_failure": "failure",
              "nv_inference_count": "inferences", "nv_inference_exec_count": "executions",
              "nv_inference_queue_duration_us": "queue_us", "nv_inference_compute_infer_duration_us": "infer_us",
              "nv_inference_compute_input_duration_us": "input_us",
              "nv_inference_compute_output_duration_us": "output_us"}
    models: dict[str, dict] = {}
    gpu: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name.endswith("_total") and name[: -len("_total")] in wanted:
                name = name[: -len("_total")]
            if name in wanted and "model" in sample.labels:
                row = models.setdefault(sample.labels["model"], {})
                key = wanted[name]
                row[key] = row.get(key, 0.0) + float(sample.value)
            elif name.startswith("nv_gpu_"):
                gpu[name] = gpu.get(name, 0.0) + float(sample.value)
    return {"models": models, "gpu": gpu}


def model_rows(models: dict) -> list[list]:
    rows = []
    for name in sorted(models):
        m = models[name]
        success, executions = m.get("success", 0.0), m.get("executions", 0.0)
        ratio = m.get("inferences", 0.0) / executions if executions else None
        queue = m.get("queue_us", 0.0) / success / 1000 if success else None
        compute = (m.get("input_us", 0.0) + m.get("infer_us", 0.0) + m.get("output_us", 0.0)) / success / 1000 \
            if success else None
        rows.append([name, int(success), int(m.get("failure", 0)), int(m.get("inferences", 0)), int(executions),
                     None if ratio is None else round(ratio, 3), None if queue is None else round(queue, 4),
                     None if compute is None else round(compute, 4)])
    return rows


class MetricsMonitor:
    """Samples Triton's metrics, the server process, the machine and the GPU; keeps a short history."""

    def __init__(self, metrics_url: str, server_pid: int | None = None):
        self.metrics_url = metrics_url
        self._pid = server_pid
        self._process: ProcessTree | None = None
        self._last_cpu_time = 0.0
        self.history: deque = deque(maxlen=HISTORY)
        self._last_success: tuple[float, float] | None = None
        self._lock = threading.Lock()
        psutil.cpu_percent(None)  # the first call starts the interval

    def server_process(self) -> ProcessTree | None:
        """The Triton server's process tree (the pid given, else the process listening on the metrics port)."""
        if self._process is not None and self._process.is_running():
            return self._process
        pid = self._pid
        if pid is None:
            port = urlparse(self.metrics_url).port
            pid = listening_pid(port) if port else None
        try:
            self._process = ProcessTree(pid) if pid else None
            if self._process is not None:
                self._process.sample()  # the first sample starts the CPU interval
                self._last_cpu_time = time.monotonic()
        except psutil.Error:
            self._process = None
        return self._process

    def _process_usage(self) -> dict:
        """The server tree's CPU % since the previous call (100 = one core), RSS MB (2**20) and children."""
        tree = self.server_process()
        if tree is None:
            return {"pid": None, "cpu_pct": None, "rss_mb": None, "children": 0}
        try:
            used, rss, children = tree.sample()
        except psutil.Error:
            self._process = None
            return {"pid": None, "cpu_pct": None, "rss_mb": None, "children": 0}
        now = time.monotonic()
        wall, self._last_cpu_time = now - self._last_cpu_time, now
        cpu = 100 * used / wall if wall > 0 else 0.0
        return {"pid": tree.pid, "cpu_pct": round(cpu, 1), "rss_mb": round(rss / 2**20, 1), "children": children}

    def sample(self) -> dict:
        with self._lock:
            now = time.time()
            snapshot: dict = {"time": now, "error": None}
            try:
                parsed = parse_triton_metrics(fetch_metrics(self.metrics_url))
            except ServingError as e:
                parsed, snapshot["error"] = {"models": {}, "gpu": {}}, str(e)
            snapshot["models"] = parsed["models"]
            snapshot["triton_gpu"] = parsed["gpu"]
            snapshot["server"] = self._process_usage()
            memory = psutil.virtual_memory()
            snapshot["machine"] = {"cpu_pct": psutil.cpu_percent(None), "cpus": psutil.cpu_count(),
                                   "memory_used_mb": round((memory.total - memory.available) / 2**20, 1),
                                   "memory_total_mb": round(memory.total / 2**20, 1)}
            snapshot["gpu"] = gpu_usage()
            success = sum(m.get("success", 0.0) for m in parsed["models"].values())
            rate = None
            if self._last_success is not None and snapshot["error"] is None and now > self._last_success[0]:
                rate = max(0.0, (success - self._last_success[1]) / (now - self._last_success[0]))
            if snapshot["error"] is None:
                self._last_success = (now, success)
            snapshot["requests_per_s"] = rate
            self.history.append({"time": now, "server_cpu": snapshot["server"]["cpu_pct"],
                                 "server_rss_mb": snapshot["server"]["rss_mb"],
                                 "machine_cpu": snapshot["machine"]["cpu_pct"], "requests_per_s": rate})
            return snapshot
