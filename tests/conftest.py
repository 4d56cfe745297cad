"""Shared fixtures: presets trained once per machine, one built repository and one Triton per test session.

Presets are cached in DYNGATE_CACHE (default: the repository's .cache, shared with `make demo`). The test
repository is built into a temporary folder with small evaluation counts; Triton runs on free ports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DYNGATE_DATA") or ROOT.parent / "shared" / "data")
PRESET_NAMES = ("distilbert-tiny", "vit-tiny", "deberta-tiny")
BASELINE_VARIANTS = ("fp32", "torchscript")
# Debian's Chromium (apt packages chromium, chromium-driver; `make browser`), never a downloaded build.
CHROMIUM = "/usr/bin/chromium"
PAGE_TIMEOUT_MS = 120_000  # a page step on a loaded 2-core machine (Gradio, Triton and the browser share it)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"test data folder {DATA_DIR} is missing: set DYNGATE_DATA or put shared/ beside the repo")
    return DATA_DIR


@pytest.fixture(scope="session")
def data_source(data_dir):
    """The project's shared data folder (../shared/data beside the repository, or $DYNGATE_DATA)."""
    from dyngate_build.data import DataSource

    return DataSource.from_setting(str(data_dir))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    path = Path(os.environ.get("DYNGATE_CACHE", ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def preset_checkpoint(cache_dir, data_source):
    """preset_checkpoint(name) -> checkpoint folder, trained on first use and reused afterwards."""
    from dyngate_build.presets import ensure_preset

    def get(name: str) -> Path:
        return ensure_preset(name, cache_dir, data_source)

    return get


@pytest.fixture(scope="session")
def preset_checkpoints(preset_checkpoint) -> dict[str, Path]:
    """Checkpoint folder of every preset."""
    return {name: preset_checkpoint(name) for name in PRESET_NAMES}


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory, preset_checkpoints, cache_dir, data_dir) -> Path:
    """A model repository with the baseline variants (python and native flavours) of the three presets."""
    from dyngate_build.pipeline import BuildOptions, build

    repository = tmp_path_factory.mktemp("repo") / "model_repository"
    for name in PRESET_NAMES:
        build(BuildOptions(model=name, techniques=BASELINE_VARIANTS, repository=repository, cache_dir=cache_dir,
                           data=str(data_dir), eval_limit=200, check_limit=32, latency_samples=10),
              log=lambda *a: None)
    return repository


@pytest.fixture(scope="session")
def text_repository(tmp_path_factory, preset_checkpoint, cache_dir, data_dir) -> Path:
    """A small repository: fp32 + torchscript of distilbert-tiny only (python and native flavours)."""
    from dyngate_build.pipeline import BuildOptions, build

    preset_checkpoint("distilbert-tiny")
    repository = tmp_path_factory.mktemp("text-repo") / "model_repository"
    build(BuildOptions(model="distilbert-tiny", techniques=BASELINE_VARIANTS, repository=repository,
                       cache_dir=cache_dir, data=str(data_dir), eval_limit=100, check_limit=16, latency_samples=10),
          log=lambda *a: None)
    return repository


@contextlib.contextmanager
def running_triton(repository: Path, log_file: Path, models: list[str] | None = None):
    """An embedded Triton on free loopback ports serving `repository` (default: every python-backend model)."""
    from dyngate_serving.launcher import TritonServer, TritonServerConfig
    from dyngate_serving.net import free_ports

    http, grpc, metrics = free_ports(3)
    config = TritonServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                                models=models, log_file=log_file)
    with TritonServer(config) as server:
        yield server


@contextlib.contextmanager
def running_gateway(repository: Path, triton, **settings):
    """The gateway (page + JSON routes) on a free loopback port in front of `triton` (a running TritonServer),
    reading its metrics, inference over Triton's HTTP endpoint as `make demo` runs it; `settings` are more
    GatewayConfig fields (limits, server_pid, intervals, triton_http_url=None for inference over gRPC, ...)."""
    from dyngate_gateway import app as gateway_app
    from dyngate_gateway.config import GatewayConfig
    from dyngate_serving.net import free_port

    settings = {"triton_http_url": triton.endpoints["http"], **settings}
    config = GatewayConfig(metrics_url=triton.endpoints["metrics"], **settings)
    running = gateway_app.serve(Path(repository), triton.endpoints["grpc"], port=free_port(), config=config)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="session")
def triton(built_repository, tmp_path_factory):
    """The embedded Triton serving `built_repository` on free ports (python-backend models loaded)."""
    with running_triton(built_repository, tmp_path_factory.mktemp("triton") / "triton.log") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(built_repository, triton, data_dir):
    """The gateway in front of the session's `triton`, status line and metrics refreshed every second, the Compare
    tab's dev inputs from `data_dir`; one per test module (a module may define its own `gateway` instead)."""
    with running_gateway(built_repository, triton, status_interval_s=1, metrics_interval_s=1,
                         data=str(data_dir)) as running:
        yield running



def run_in_own_loop(coroutine):
    """asyncio.run in a worker thread: the browser tests' Playwright keeps an event loop running in the main one."""
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        return worker.submit(asyncio.run, coroutine).result()

# JavaScript for page.evaluate(READ_TABLE, elem_id): the rows of a Gradio Dataframe as lists of cell texts
READ_TABLE = """(id) => {
  const rows = [];
  for (const cell of document.querySelectorAll('#' + id + ' [role=gridcell][data-row][data-col]')) {
    const r = +cell.dataset.row, c = +cell.dataset.col;
    (rows[r] = rows[r] || [])[c] = cell.innerText.trim();
  }
  return rows.filter(Boolean);
}"""


def open_page(browser, url: str, ready: str = "is ready", height: int = 1000, timeout_ms: int = PAGE_TIMEOUT_MS):
    """A new Chromium page (1280 × `height`) on the gateway at `url`, returned once the Triton status line on top
    (#triton-status) contains `ready` ("is ready"; "Triton" for any state, e.g. with Triton down)."""
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.set_default_timeout(timeout_ms)
    page.goto(url)
    page.wait_for_function("(ready) => document.querySelector('#triton-status') && "
                           "document.querySelector('#triton-status').innerText.includes(ready)", arg=ready)
    return page


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """A full-page PNG of `page` at tmp_path/<name>.png, copied to /tmp/<name>.png (docs/ holds copies of those,
    linked from the README); returns the first path."""
    import shutil

    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    try:
        shutil.copyfile(shot, f"/tmp/{name}.png")
    except OSError:
        pass
    return shot


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Playwright, shared by the page tests."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def post_predict(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    """POST `body` (a dict, or raw bytes) to the gateway's /api/predict at `url`: (status, JSON answer)."""
    import json
    import urllib.error
    import urllib.request

    from dyngate_serving.net import DIRECT

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/api/predict", data=data, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with DIRECT.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
