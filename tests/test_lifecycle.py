"""Life cycle of served variants on a real Triton: hot rebuilds, refused corrupt files, a supervised server.

- A variant rebuilt while a steady stream of requests hits it becomes version 2 beside version 1; Triton moves
  traffic to it, the old folder is deleted, and no request fails or waits longer than 2 s (model control goes
  over gRPC: an HTTP load would stall the HTTP clients for seconds).
- A truncated ONNX or TorchScript export is refused by the build; a truncated file that reaches the repository
  anyway is refused by Triton, which keeps serving the previous version, and the gateway shows why.
- `dyngate serve` reloads a model whose python stub was killed (Triton alone keeps it READY and fails every
  request), restarts a Triton killed with SIGKILL (the gateway recovers on its own) and gives up, with the
  exit code and log in its error, once the restart budget is spent.

Each test serves a copy of the session's `built_repository` holding only the model it needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from dyngate_build.errors import ConfigError, ExportError, RepositoryError, ServingError
from dyngate_build.pipeline import BuildOptions, build
from dyngate_build.repository import (METADATA_FILE, ServingOptions, finish_model, python_config,
                              staged_repository, version_numbers, write_version)
from dyngate_build.techniques import TECHNIQUES, Tolerance, Variant, register
from dyngate_serving.client import TritonClient
from dyngate_serving.client import model_control_client
from dyngate_serving.net import free_port, free_ports
from dyngate_serving.rollout import after_publish, roll_out
from tests.conftest import ROOT, running_triton

MODEL = "distilbert-tiny"
NAME = f"{MODEL}__fp32"
SENTENCES = [b"a gripping, beautifully shot film", b"dull and far too long", b"it was fine"]
WAIT_S = 240  # upper bound for a start or restart on a loaded 2-core machine (a bound, never an assertion)
SLOW_S = 2.0  # a request slower than this during a reload was blocked by it (an HTTP load stalls 3.9-8.7 s)


def _snapshot(repository: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repository)): p.read_bytes() for p in sorted(repository.rglob("*")) if p.is_file()}


def _copy_model(built_repository: Path, target: Path, name: str = NAME) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(built_repository / name, target / name)
    return target


def _wait_for(condition, what: str, timeout_s: float = WAIT_S, poll_s: float = 0.2, detail=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"gave up waiting {timeout_s:.0f} s for {what}{detail()}")


@dataclass
class _Traffic:
    """A steady stream of requests to one model from `threads` threads, each with its own tritonclient."""

    url: str
    model: str
    threads: int = 3
    protocol: str = "grpc"

    def __post_init__(self):
        self.sent, self.failed, self.errors, self.labels = [0] * self.threads, 0, [], {}
        self.slow: list[float] = []  # seconds of each request slower than SLOW_S
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]

    def _run(self, index: int) -> None:
        client = TritonClient(self.url, protocol=self.protocol, timeout_s=30)
        i = 0
        while not self._stop.is_set():
            raw = SENTENCES[i % len(SENTENCES)]
            i += 1
            started = time.perf_counter()
            try:
                label = client.predict(self.model, raw).answer["label"]
            except Exception as e:  # any failure counts: that is what the tests measure
                with self._lock:
                    self.failed += 1
                    self.errors.append(f"{type(e).__name__}: {e}")
                continue
            seconds = time.perf_counter() - started
            with self._lock:
                self.sent[index] += 1
                self.labels.setdefault(raw, set()).add(label)
                if seconds > SLOW_S:
                    self.slow.append(round(seconds, 2))
        client.close()

    @property
    def total(self) -> int:
        return sum(self.sent) + self.failed

    def __enter__(self) -> "_Traffic":
        for w in self._workers:
            w.start()
        _wait_for(lambda: all(n > 0 for n in self.sent) or self.failed, "every client's first answer")
        return self

    def at_least(self, more: int) -> None:
        """Wait until every thread answered `more` more requests than now (so the stream covers what came before)."""
        marks = list(self.sent)
        _wait_for(lambda: all(n >= m + more for n, m in zip(self.sent, marks)) or self.failed > 100,
                  f"{more} more answers per client")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(60)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _shm_prefix(pid: int) -> str:
    flag = "--backend-config=python,shm-region-prefix-name="
    return next(a[len(flag):] for a in psutil.Process(pid).cmdline() if a.startswith(flag))


def _served_versions(server) -> list[str]:
    with server.client() as client:
        return [str(v) for v, entry in sorted(client.versions(NAME).items()) if entry.get("state") == "READY"]


# ----------------------------------------------------------------------------------------- hot rebuild

def test_rebuild_while_serving_moves_traffic_to_the_new_version_without_a_failed_request(
        built_repository, tmp_path, cache_dir, data_dir):
    repository = _copy_model(built_repository, tmp_path / "repo")
    with running_triton(repository, tmp_path / "triton.log", models=[NAME]) as server:
        assert _served_versions(server) == ["1"]
        log: list[str] = []
        with _Traffic(server.endpoints["grpc"], NAME) as grpc_traffic, \
                _Traffic(server.endpoints["http"], NAME, threads=1, protocol="http") as http_traffic:
            build(BuildOptions(model=MODEL, techniques=("fp32",), repository=repository, cache_dir=cache_dir,
                               data=str(data_dir), eval_limit=50, check_limit=16, latency_samples=2, native=False),
                  log=log.append, after_publish=after_publish(model_control_client(server.endpoints["grpc"]),
                                                              log.append))
            grpc_traffic.at_least(20)
            http_traffic.at_least(20)
        slow = grpc_traffic.slow + http_traffic.slow
        print(f"\nrebuild under load: {grpc_traffic.total + http_traffic.total} requests, "
              f"{grpc_traffic.failed + http_traffic.failed} failed, {len(slow)} slower than {SLOW_S:.0f} s {slow}")
        assert grpc_traffic.failed == 0 and http_traffic.failed == 0, (grpc_traffic.errors + http_traffic.errors)[:5]
        assert len(http_traffic.slow) == 0 and len(grpc_traffic.slow) == 0, slow
        assert _served_versions(server) == ["2"]
        # the same weights before and after: every sentence kept its one label across the switch
        assert all(len(labels) == 1 for labels in grpc_traffic.labels.values())
    folder = repository / NAME
    assert version_numbers(folder) == [2]
    assert (folder / "2" / "model.onnx").is_file()
    assert json.loads((folder / METADATA_FILE).read_text())["version"] == 2
    assert any("serves version 2" in line for line in log) and any("removed old version" in line for line in log)
    assert not list(tmp_path.glob(".repo.staging-*")) and not list(tmp_path.glob(".repo.trash-*"))


def _staged_model(staging: Path, name: str, marker: str) -> None:
    version = write_version(staging, name, 1, {})
    (version / "model.onnx").write_text(marker)
    finish_model(version.parent, python_config(name, "TEXT", 1, ServingOptions()), {"marker": marker})


def test_without_triton_a_rebuild_adds_a_version_and_keeps_the_two_before(tmp_path):
    """Found in a trial: with one previous version kept, the second build without --triton deleted the version
    folder a running Triton served (version 1 here, loaded before the builds). The served one must survive two
    builds; the third deletes it."""
    from dyngate_build.repository import keep_previous_version

    repository, log = tmp_path / "repo", []
    folder = repository / "m__v"
    for build_number in range(1, 4):
        with staged_repository(repository, lambda published: [keep_previous_version(p, log.append)
                                                              for p in published]) as staging:
            _staged_model(staging, "m__v", f"build {build_number}")
    assert version_numbers(folder) == [1, 2, 3]  # 1 may still be served by a Triton nobody told
    assert "version(s) 1, 2 kept for a Triton that may still serve them" in log[-1]
    assert json.loads((folder / METADATA_FILE).read_text()) == {"marker": "build 3", "version": 3}
    assert (folder / "3" / "model.onnx").read_text() == "build 3"
    with staged_repository(repository, lambda published: [keep_previous_version(p, log.append)
                                                          for p in published]) as staging:
        _staged_model(staging, "m__v", "build 4")
    assert version_numbers(folder) == [2, 3, 4] and "removed older version(s) [1]" in log[-1]

    before = _snapshot(repository)
    with pytest.raises(RuntimeError, match="planted"):
        with staged_repository(repository) as staging:
            _staged_model(staging, "m__v", "build 5")
            _staged_model(staging, "m__new", "build 5")
            raise RuntimeError("planted failure after staging")
    assert _snapshot(repository) == before

    def refuse(published):  # what the pipeline does when Triton refuses the new version
        for p in published:
            p.undo()
        raise ServingError("planted refusal")

    with pytest.raises(ServingError, match="planted refusal"):
        with staged_repository(repository, after_publish=refuse) as staging:
            _staged_model(staging, "m__v", "build 6")
            _staged_model(staging, "m__new", "build 6")
    assert _snapshot(repository) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_keep_previous_version_keeps_the_newest_and_the_count_before_it(tmp_path, monkeypatch, keep):
    """The rule counts versions (repository.KEEP_PREVIOUS_VERSIONS, read when it runs): after every build without
    --triton the folder holds the new version and the `keep` before it; a version loaded before the builds (the one
    a Triton serves) is gone only after `keep` + 1 builds. With 0 every previous version goes, never the newest."""
    from dyngate_build import repository as repository_module

    monkeypatch.setattr(repository_module, "KEEP_PREVIOUS_VERSIONS", keep)
    repository = tmp_path / "repo"
    folder = repository / "m__v"
    served = 1
    for build_number in range(1, keep + 4):
        with staged_repository(repository, lambda published: [repository_module.keep_previous_version(p, lambda _: None)
                                                              for p in published]) as staging:
            _staged_model(staging, "m__v", f"build {build_number}")
        assert version_numbers(folder) == list(range(max(1, build_number - keep), build_number + 1))
        assert (folder / str(build_number) / "model.onnx").read_text() == f"build {build_number}"
        assert (served in version_numbers(folder)) == (build_number - served <= keep)


# ----------------------------------------------------------------------------------- corrupt model files

@dataclass(frozen=True)
class _TruncatedConfig:
    """A technique whose export is cut short (what a full disk or a killed exporter leaves behind)."""


def _truncated(engine: str):
    def apply(context, config):
        from dyngate_build.export import export_onnx, export_torchscript

        source = context.source
        if engine == "onnxruntime":
            path = export_onnx(source.model, source.family, context.work_dir / "cut.onnx")
        else:
            path = export_torchscript(source.model, source.family, context.work_dir / "cut.pt")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return Variant("truncated", f"test-truncated-{engine}", {}, engine, path, Tolerance(1e-3, 0.99))

    return apply


@pytest.mark.parametrize("engine,artifact", [("onnxruntime", "model.onnx"), ("torchscript", "model.pt")])
def test_truncated_export_is_refused_and_the_repository_is_unchanged(built_repository, tmp_path, cache_dir,
                                                                     data_dir, engine, artifact):
    repository = tmp_path / "repo"
    shutil.copytree(built_repository, repository)
    before = _snapshot(repository)
    technique = f"test-truncated-{engine}"
    register(technique, _TruncatedConfig)(_truncated(engine))
    try:
        with pytest.raises(ExportError, match=rf"exported {re.escape(artifact)} \(\d+ bytes\) cannot be loaded "
                                              r".*corrupt or truncated; nothing was written"):
            build(BuildOptions(model=MODEL, techniques=("fp32", technique), repository=repository,
                               cache_dir=cache_dir, data=str(data_dir), eval_limit=20, check_limit=8,
                               latency_samples=2), log=lambda *a: None)
    finally:
        TECHNIQUES.pop(technique, None)
    assert _snapshot(repository) == before
    assert not list(tmp_path.glob(".repo.staging-*"))


def test_corrupt_version_in_the_repository_keeps_the_old_one_serving_and_the_gateway_says_why(
        built_repository, tmp_path, capsys):
    from dyngate_cli import main
    from dyngate_gateway import models_view
    from dyngate_gateway.app import serve as serve_gateway
    from dyngate_gateway.handlers import ClientPool

    repository = _copy_model(built_repository, tmp_path / "repo")
    folder = repository / NAME
    with running_triton(repository, tmp_path / "triton.log", models=[NAME]) as server:
        shutil.copytree(folder / "1", folder / "2")
        onnx = folder / "2" / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 3])
        reload = ["reload", "--model", MODEL, "--variant", "fp32", "--repository", str(repository),
                  "--triton", server.endpoints["grpc"]]
        with _Traffic(server.endpoints["grpc"], NAME, threads=2) as traffic:
            capsys.readouterr()
            assert main(reload) == 2
            assert re.search(r"error: Triton refused version 2 of distilbert-tiny__fp32: .*Protobuf parsing failed.*; "
                             r"it keeps serving version 1", capsys.readouterr().err)
            traffic.at_least(10)
        with capsys.disabled():
            print(f"\ncorrupt version 2 under load: {traffic.total} requests, {traffic.failed} failed")
        assert traffic.failed == 0, traffic.errors[:5]
        assert _served_versions(server) == ["1"]
        assert version_numbers(folder) == [1, 2]  # nothing deleted: the operator sees and fixes it

        clients = ClientPool(server.endpoints["grpc"])
        row = dict(zip(models_view.HEADERS, models_view.model_rows(repository, clients)[0]))
        assert row["state"] == "FAILED" and row["version"] == "2 failed; serving 1"
        assert "Protobuf parsing failed" in row["reason"] and "At:" not in row["reason"]

        gateway = serve_gateway(repository, server.endpoints["grpc"], port=free_port())
        try:
            with urllib.request.urlopen(f"{gateway.url}/api/models", timeout=30) as response:
                api_rows = json.loads(response.read())
            assert [(r["triton model"], r["state"]) for r in api_rows] == [(NAME, "FAILED")]
            assert "Protobuf parsing failed" in api_rows[0]["reason"]
            answer = _post(f"{gateway.url}/api/predict", {"model": MODEL, "text": "a fine film"})
            assert answer[0] == 200, answer

            shutil.copyfile(folder / "1" / "model.onnx", onnx)  # the operator repairs version 2 and reloads
            assert main(reload) == 0
            assert "Triton serves version 2; removed version(s) 1" in capsys.readouterr().out
            assert _served_versions(server) == ["2"] and version_numbers(folder) == [2]
            with urllib.request.urlopen(f"{gateway.url}/api/models", timeout=30) as response:
                row = json.loads(response.read())[0]
            assert (row["state"], row["version"], row["reason"]) == ("READY", "2", "")
        finally:
            gateway.close()


def test_models_view_names_the_served_version_and_ignores_failures_no_longer_on_disk(tmp_path):
    from dyngate_gateway.models_view import variant_state

    folder = tmp_path / NAME
    (folder / "1").mkdir(parents=True)
    (folder / "2").mkdir()
    ready_1 = {"name": NAME, "version": "1", "state": "READY"}
    assert variant_state(folder, [ready_1]) == ("READY", "1 (2 on disk, not loaded)", "")
    failed_2 = {"name": NAME, "version": "2", "state": "UNAVAILABLE", "reason": "Internal: bad file\n\nAt:\n  x.py"}
    assert variant_state(folder, [ready_1, failed_2]) == ("FAILED", "2 failed; serving 1", "Internal: bad file")
    shutil.rmtree(folder / "2")  # the operator removed the bad version: Triton's index still remembers it
    assert variant_state(folder, [ready_1, failed_2]) == ("READY", "1", "")


def test_build_with_an_unreachable_triton_fails_before_any_work(tmp_path, cache_dir, capsys):
    from dyngate_build.errors import TritonUnreachable
    from dyngate_cli import main

    repository = tmp_path / "repo"
    address = f"127.0.0.1:{free_port()}"
    argv = ["build", "--model", MODEL, "--techniques", "fp32", "--repository", str(repository), "--cache-dir",
            str(cache_dir), "--triton", address]
    assert main(argv) == 2
    assert re.search(rf"error: Triton at {address} is not reachable", capsys.readouterr().err)
    with pytest.raises(TritonUnreachable):
        model_control_client(address).index()
    assert not repository.exists()
    with pytest.raises(ConfigError, match="gRPC"):  # model control never goes through Triton's HTTP endpoint
        model_control_client("http://127.0.0.1:8000")


def test_reload_refuses_a_folder_without_versions(tmp_path):
    folder = tmp_path / "repo" / NAME
    folder.mkdir(parents=True)
    with pytest.raises(ServingError, match="has no version folder"):
        roll_out(model_control_client("127.0.0.1:9"), folder)
    with pytest.raises(RepositoryError, match="refusing to remove version 3"):
        from dyngate_build.repository import remove_versions

        (folder / "3").mkdir()
        remove_versions(folder, [3])


# ------------------------------------------------------------------------------------------- supervision

def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_serve_restarts_a_killed_triton_the_gateway_recovers_and_serve_gives_up_past_its_budget(
        built_repository, tmp_path):
    from dyngate_gateway.app import serve as serve_gateway
    from dyngate_gateway.config import GatewayConfig

    repository = _copy_model(built_repository, tmp_path / "repo")
    http, grpc, metrics = free_ports(3)
    out_path = tmp_path / "serve.out"
    command = [sys.executable, "-m", "dyngate_cli", "serve", "--repository", str(repository), "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--models", NAME, "--max-restarts", "1"]
    with open(out_path, "wb") as out:
        serve = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1",
                                      "TMPDIR": str(tmp_path)})  # the kept log of the killed Triton stays here

    def pids() -> list[int]:
        return [int(p) for p in re.findall(r"Triton ready \(pid (\d+)\)", out_path.read_text(errors="replace"))]

    gateway = None
    try:
        _wait_for(lambda: "Ctrl-C stops" in out_path.read_text() or serve.poll() is not None, "dyngate serve")
        assert serve.poll() is None, out_path.read_text()
        first = pids()[0]
        gateway = serve_gateway(repository, f"127.0.0.1:{grpc}", port=free_port(),  # inference over HTTP, as deployed
                                config=GatewayConfig(triton_http_url=f"127.0.0.1:{http}"))
        body = {"model": MODEL, "text": "a fine film"}
        assert _post(f"{gateway.url}/api/predict", body)[0] == 200

        stubs = [p for p in psutil.Process(first).children(recursive=True) if p.name().startswith("triton_python")]
        assert len(stubs) == 1, stubs
        stubs[0].kill()  # fault 0: a dead stub, the server itself alive
        answers = []
        _wait_for(lambda: answers.append(_post(f"{gateway.url}/api/predict", body)) or answers[-1][0] == 200,
                  "the gateway's first answer after the stub was reloaded", poll_s=0.5,
                  detail=lambda: f"; last answer {answers[-1]}; dyngate serve said:\n{out_path.read_text()}")
        assert any(status != 200 for status, _ in answers), answers  # it was broken, then healed
        assert f"model {NAME}: python stub {NAME}_0_0 died while Triton reports it READY; loading it again" \
            in out_path.read_text()
        assert f"model {NAME}: loaded again" in out_path.read_text()
        assert pids() == [first]  # healed without a restart

        prefix = _shm_prefix(first)
        assert list(Path("/dev/shm").glob(prefix + "*"))  # the python backend's regions of this server
        os.kill(first, signal.SIGKILL)  # fault 1: survived by a restart
        second = _wait_for(lambda: len(pids()) >= 2 and pids()[1], "the restarted Triton")
        assert second != first and _gone(first)
        assert not list(Path("/dev/shm").glob(prefix + "*"))  # what the killed server left is cleaned up
        attempts = []
        _wait_for(lambda: attempts.append(_post(f"{gateway.url}/api/predict", body)) or attempts[-1][0] == 200,
                  "the gateway's first answer after the restart", poll_s=0.5)
        print(f"\nkill -9 of Triton {first}: restarted as {second}; gateway answered again after "
              f"{len(attempts)} attempt(s)")
        text = out_path.read_text()
        assert f"Triton (pid {first}) exited on its own (exit code -9); restarting it (1/1 within 300 s)" in text

        os.kill(second, signal.SIGKILL)  # fault 2: past the budget of one restart
        code = serve.wait(WAIT_S)
        text = out_path.read_text()
        assert code == 2, text
        assert f"error: Triton (pid {second}) exited on its own (exit code -9); it died 2 times within 300 s" in text
        assert "giving up" in text and "Last lines of" in text
        assert len(pids()) == 2 and _gone(second)
        status, answer = _post(f"{gateway.url}/api/predict", body)
        assert status == 503 and "not reachable" in answer["error"], answer
    finally:
        if gateway is not None:
            gateway.close()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(60)


def _serve(repository: Path, tmp_path: Path, *flags: str, sigint_ignored: bool = False
           ) -> tuple[subprocess.Popen, Path, int, int]:
    """`dyngate serve` on free ports with its temporary files in tmp_path/tmp (TMPDIR), started and ready:
    (process, file of its output, Triton's pid from its ready line, Triton's HTTP port). `sigint_ignored`: started
    as a shell starts a background job (SIGINT ignored, inherited)."""
    http, grpc, metrics = free_ports(3)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    out_path = tmp_path / "serve.out"
    command = [sys.executable, "-m", "dyngate_cli", "serve", "--repository", str(repository), "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), *flags]
    with open(out_path, "wb") as out:
        serve = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path / "tmp")},
                                 preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored
                                 else None)
    try:
        _wait_for(lambda: "Ctrl-C stops" in out_path.read_text() or serve.poll() is not None, "dyngate serve")
        assert serve.poll() is None, out_path.read_text()
        ready = re.search(r"^Triton ready \(pid (\d+)\) in [0-9.]+ s \(log: ", out_path.read_text(), re.M)
        assert ready, out_path.read_text()
    except BaseException:
        if serve.poll() is None:  # Triton follows it (PR_SET_PDEATHSIG)
            serve.send_signal(signal.SIGTERM)
            serve.wait(60)
        raise
    return serve, out_path, int(ready.group(1)), http


def test_serve_says_which_number_is_tritons_pid_and_removes_its_log_after_a_clean_stop(text_repository, tmp_path):
    """Found in a new user's trial: "Triton 12345 ready" read like a port, and every run left a
    /tmp/dyngate-triton-<port>-*.log behind. The line says pid, and it is the pid of the tritonserver process (the
    ports are listed below it); the temporary log it names is gone after SIGTERM, no dyngate file is left in TMPDIR."""
    serve, out_path, pid, http = _serve(_copy_model(text_repository, tmp_path / "repo"), tmp_path)
    try:
        assert psutil.Process(pid).name() == "tritonserver"
        assert f"  http     http://127.0.0.1:{http}" in out_path.read_text()
        log = Path(re.search(r"\(log: (\S+); removed after a clean stop, kept if Triton fails\)",
                             out_path.read_text()).group(1))
        assert log.parent == tmp_path / "tmp" and log.exists()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(WAIT_S) == 0, out_path.read_text()
        assert _gone(pid)
        assert list((tmp_path / "tmp").glob("dyngate-*")) == []
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(60)


def test_serve_started_in_the_background_stops_on_sigint(text_repository, tmp_path):
    """Found in a new user's trial: `dyngate serve &` from a script inherits SIGINT ignored, so `kill -INT` did
    nothing for 10 minutes (SIGTERM worked). serve now handles SIGINT itself, as it does SIGTERM."""
    serve, out_path, pid, _ = _serve(_copy_model(text_repository, tmp_path / "repo"), tmp_path, sigint_ignored=True)
    try:
        serve.send_signal(signal.SIGINT)
        assert serve.wait(WAIT_S) == 0, out_path.read_text()
        assert out_path.read_text().rstrip().endswith("stopping Triton ...\nTriton stopped") and _gone(pid)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(60)


def test_serve_keeps_the_log_of_a_triton_that_died_and_names_it(text_repository, tmp_path):
    """The other half of the rule: when serve gives up on a Triton that died, its error names the temporary log
    and the log is still there to read."""
    serve, out_path, pid, _ = _serve(_copy_model(text_repository, tmp_path / "repo"), tmp_path, "--max-restarts", "0")
    try:
        os.kill(pid, signal.SIGKILL)
        assert serve.wait(WAIT_S) == 2, out_path.read_text()
        (log,) = (tmp_path / "tmp").glob("dyngate-triton-*.log")
        assert f"Look at the log for the cause ({log})" in out_path.read_text()
        assert "Started GRPCInferenceService" in log.read_text()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(60)


def test_an_idle_http_client_holds_a_stop_for_serves_exit_timeout_only(text_repository, tmp_path):
    """Found in a new user's trial: SIGTERM to `dyngate serve` took ~10 s with no request in flight. Measured: an
    idle keep-alive HTTP connection (the gateway with --triton-http keeps one) holds Triton's stop for all of its
    --exit-timeout-secs, 10 then; gRPC connections do not. It is serve's --exit-timeout now (default 5 s): Triton's
    log counts the wait down from the value given, no longer. A --log-file is kept after the clean stop."""
    from http.client import HTTPConnection

    from dyngate_serving.launcher import TritonServerConfig

    with pytest.raises(ConfigError, match="exit_timeout_s=-1 must be whole seconds ≥ 0"):
        TritonServerConfig(tmp_path, exit_timeout_s=-1)
    log = tmp_path / "kept" / "triton.log"
    serve, out_path, pid, http = _serve(_copy_model(text_repository, tmp_path / "repo"), tmp_path,
                                        "--exit-timeout", "2", "--log-file", str(log))
    connection = HTTPConnection("127.0.0.1", http, timeout=60)
    try:
        connection.request("GET", "/v2/health/ready")  # HTTP/1.1: the connection stays open, idle
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        assert f"(log: {log})" in out_path.read_text()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(WAIT_S) == 0, out_path.read_text()
        waits = re.findall(r"Timeout (\d+): Found 1 HTTP service connections", log.read_text())
        assert waits and int(waits[0]) == 2, log.read_text()
    finally:
        connection.close()
        if serve.poll() is None:
            serve.kill()
            serve.wait(60)


def test_supervisor_leaves_a_model_alone_while_a_new_version_of_it_loads(text_repository, tmp_path):
    """Found in a trial: `dyngate reload` after a build without --triton made `dyngate serve` say the model's python
    stub had died while Triton reported it READY, and load the model once more: a load runs a model-level stub that
    exits when the load is done, and the old version's stubs go while the new version's come. Watched every 50 ms
    through a roll-out to version 2, the supervisor reloads nothing; a stub killed afterwards is still reloaded."""
    import io

    from dyngate_serving.launcher import TritonServerConfig
    from dyngate_serving.supervisor import Supervisor

    repository = _copy_model(text_repository, tmp_path / "repo")
    folder = repository / NAME
    http, grpc, metrics = free_ports(3)
    out = io.StringIO()
    supervisor = Supervisor(TritonServerConfig(repository, http, grpc, metrics, models=[NAME],
                                               log_file=tmp_path / "triton.log"), out=out, poll_s=0.05)
    supervisor.start()
    watcher = threading.Thread(target=supervisor.watch, daemon=True)
    watcher.start()
    try:
        shutil.copytree(folder / "1", folder / "2")  # what a build without --triton leaves: a newer version folder
        with model_control_client(supervisor.server.endpoints["grpc"]) as client:
            assert roll_out(client, folder, log=lambda line: None).version == 2
        time.sleep(1.0)  # twenty polls after the roll-out: a stub counted missing would be reported by now
        assert "died" not in out.getvalue(), out.getvalue()
        assert _served_versions(supervisor.server) == ["2"]

        stubs = [p for p in psutil.Process(supervisor.server.pid).children(recursive=True)
                 if p.name().startswith("triton_python")]
        assert len(stubs) == 1, stubs
        stubs[0].kill()
        _wait_for(lambda: f"model {NAME}: loaded again" in out.getvalue(), "the killed stub's model to be reloaded",
                  detail=lambda: f"; the supervisor said:\n{out.getvalue()}")
        assert f"model {NAME}: python stub {NAME}_0_0 died while Triton reports it READY" in out.getvalue()
    finally:
        supervisor.stop()
        watcher.join(60)


def test_gateway_routes_to_a_variant_built_after_it_started(built_repository, tmp_path, browser):
    """A variant that appears in the repository while the gateway runs (a build with --triton) is routable
    without restarting the gateway: its catalog is re-read when the repository changes, and a page opened then
    lists it in Compare too (found in a trial: only Predict did)."""
    from dyngate_gateway.app import serve as serve_gateway
    from tests.conftest import open_page

    repository = _copy_model(built_repository, tmp_path / "repo")
    added = f"{MODEL}__torchscript"
    body = {"model": MODEL, "text": "a fine film", "policy": "variant", "variant": "torchscript"}
    with running_triton(repository, tmp_path / "triton.log", models=[NAME]) as server:
        gateway = serve_gateway(repository, server.endpoints["grpc"], port=free_port())
        try:
            status, answer = _post(f"{gateway.url}/api/predict", body)
            assert status == 400 and "unknown variant 'torchscript'" in answer["error"], answer
            staging = tmp_path / "staging"
            shutil.copytree(built_repository / added, staging)
            staging.rename(repository / added)  # as the build publishes: one rename
            server.load_model(added)
            status, answer = _post(f"{gateway.url}/api/predict", body)
            assert status == 200, answer
            assert (answer["served_by"], answer["triton_model"]) == ("torchscript", added)
            page = open_page(browser, gateway.url)
            page.get_by_role("tab", name="Compare", exact=True).click()
            page.wait_for_function("document.querySelector('#cmp-variants').innerText.includes('torchscript')")
            page.close()
            shutil.rmtree(repository / added)  # and a removed variant is gone again
            status, answer = _post(f"{gateway.url}/api/predict", body)
            assert status == 400, answer
        finally:
            gateway.close()


def test_policies_route_around_a_variant_whose_stub_crashed(built_repository, tmp_path):
    """Triton keeps listing a python-backend model READY after its stub process dies, and answers every request
    to it with an error: `fastest` and `cascade` answer from the other variant meanwhile and say so."""
    from dyngate_build.errors import ServingError
    from dyngate_gateway.handlers import ClientPool, load_catalog
    from dyngate_gateway.routing import Router, RoutingConfig

    repository = _copy_model(built_repository, tmp_path / "repo")
    added = f"{MODEL}__torchscript"
    _copy_model(built_repository, repository, added)
    with running_triton(repository, tmp_path / "triton.log", models=[NAME, added]) as server:
        stubs = [p for p in psutil.Process(server.pid).children(recursive=True)
                 if any(NAME + "_" in part for part in p.cmdline())]
        assert stubs, [p.cmdline() for p in psutil.Process(server.pid).children(recursive=True)]
        for stub in stubs:
            stub.kill()
        _wait_for(lambda: all(_gone(p.pid) for p in stubs), "the stub to die")
        client = TritonClient(server.endpoints["grpc"])
        with pytest.raises(ServingError):  # the crash is real: Triton answers the model with an error
            client.predict(NAME, SENTENCES[0])
        router = Router(load_catalog(repository), ClientPool(server.endpoints["grpc"]), RoutingConfig())
        router.live.record(NAME, 0.001)  # make the crashed variant the fastest: the policy must still skip it
        answer = router.route(MODEL, SENTENCES[0].decode(), "fastest")
        assert answer["served_by"] == "torchscript" and "skipped fp32 failed" in answer["reason"], answer
        answer = router.route(MODEL, SENTENCES[1].decode(), "cascade", threshold=0)
        assert answer["served_by"] == "torchscript", answer
        with pytest.raises(ServingError):  # a variant asked for by name is tried, and its error reported
            router.route(MODEL, SENTENCES[0].decode(), "variant", variant="fp32")
