"""Keep the embedded Triton serving: `Supervisor` restarts a Triton process that died (a bounded number of
times) and reloads a model whose python stub died; `serve_forever` is `dyngate serve` (start, print endpoints
and models, watch, stop on Ctrl-C/SIGTERM).

Why the stubs: every python-backend model instance is a `triton_python_backend_stub` process. When one dies
(killed, out of memory), Triton 2.51 keeps reporting the model READY while every request to it fails, until the
model is unloaded and loaded again (a plain load of the unchanged model keeps the dead instance).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

from dyngate_build.errors import ConfigError, ServingError
from dyngate_serving.client import short_reason
from dyngate_serving.launcher import TritonServer, TritonServerConfig, repository_models

_CHANGING = ("LOADING", "UNLOADING")  # index states of a version Triton is loading or unloading


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
        self._instances: dict[str, str] = {}  # stub instance -> model, as last seen alive
        self._missing: set[str] = set()  # instances missing at the previous poll
        # model -> {(version, state)} in Triton's index at the previous poll; None before the first start
        self._states: dict[str, set] | None = None
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
                self._died(f"Triton (pid {self.server.pid}) exited on its own (exit code {code})")
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
        if self._states is not None:  # a restart: the models that were READY at the last poll
            known = repository_models(self.config.repository)
            self.server.config.models = [m for m in _ready(self._states) if m in known]
        started = time.monotonic()
        self.server.start(append_log=append_log)
        kept = "; removed after a clean stop, kept if Triton fails" if self.server.removes_log else ""
        print(f"Triton ready (pid {self.server.pid}) in {time.monotonic() - started:.1f} s (log: "
              f"{self.server.log_path}{kept})", file=self.out, flush=True)
        self._instances, self._missing = self.server.stub_instances(), set()  # a stub may die before the first poll
        self._states = self._read_index()

    def _wait_for_exit(self) -> int | None:
        """The exit code once the process dies; None when stop() was called first."""
        process = self.server._process
        while not self._stop.is_set():
            try:
                return process.wait(self.poll_s)
            except subprocess.TimeoutExpired:
                pass
            try:
                self._reload_dead_stubs()
            except (ServingError, OSError):
                pass  # busy or dying: keep the last answer
        return None

    def _reload_dead_stubs(self) -> None:
        """Load again each settled READY model that has lost a stub process for two polls in a row.

        A model is settled when none of its versions is LOADING or UNLOADING in Triton's repository index and its
        index entries (version -> state) are the same as at the previous poll: while a new version loads
        (`dyngate reload`, `dyngate build --triton`) the old version's stubs go away and the new version's come
        up, and right after the change the stubs alive then are the new reference. Two polls, because a stub
        may be caught between exiting and being replaced. The stubs are read before the index, so a stub seen
        during a load is seen with the load's index entries.
        """
        alive = self.server.stub_instances()
        states = self._read_index()
        settled = {model for model, versions in states.items()
                   if versions == self._states.get(model) and not any(s in _CHANGING for _, s in versions)}
        self._states, ready = states, set(_ready(states))
        missing = {i for i, model in self._instances.items() if model in ready and model in settled and i not in alive}
        dead = missing & self._missing
        for model in sorted({self._instances[i] for i in dead}):
            names = ", ".join(sorted(i for i in dead if self._instances[i] == model))
            print(f"model {model}: python stub {names} died while Triton reports it READY; loading it again",
                  file=self.out, flush=True)
            try:
                # unload first: a load of an unchanged model keeps its instances (Triton reuses them), dead stub
                # included; the model fails every request anyway until it is back
                self.server.unload_model(model)
                self.server.load_model(model)
                print(f"model {model}: loaded again", file=self.out, flush=True)
            except ServingError as e:
                print(f"model {model}: reload failed: {e}", file=self.out, flush=True)
        if dead:
            alive, missing, self._states = self.server.stub_instances(), set(), self._read_index()
        self._missing = missing
        self._instances = {i: m for i, m in self._instances.items() if i in missing} | alive

    def _read_index(self) -> dict[str, set]:
        """Model -> {(version, state)} from Triton's repository index."""
        index = self.server.repository_index()
        states: dict[str, set] = {}
        for entry in index:
            states.setdefault(entry["name"], set()).add((entry.get("version"), entry.get("state")))
        return states

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
                               f"giving up. Look at the log for the cause ({self.server.log_path})." + log)
        print(f"{what}; restarting it ({len(self._deaths)}/{self.max_restarts} within {self.window_s:.0f} s)"
              + log, file=self.out, flush=True)
        time.sleep(min(0.5 * len(self._deaths), 5.0))  # let the ports and shared memory go


def _ready(states: dict[str, set]) -> list[str]:
    """The models with a READY version in `states` (model -> {(version, state)}, `Supervisor._read_index`)."""
    return sorted(model for model, versions in states.items() if any(state == "READY" for _, state in versions))


def serve_forever(config: TritonServerConfig, out=None, max_restarts: int = 3, restart_window_s: float = 300.0) -> None:
    """Start Triton, print its endpoints and models, serve until Ctrl-C or SIGTERM, then stop it cleanly.

    A Triton process that dies on its own is restarted (`Supervisor`): at most `max_restarts` times within
    `restart_window_s` seconds. Raises ServingError when the server cannot start, or dies once more than that.
    """
    out = out or sys.stdout
    supervisor = Supervisor(config, max_restarts, restart_window_s, out)
    server = supervisor.server

    def on_signal(signum, frame):
        print("stopping Triton ...", file=out, flush=True)  # before the stop: it takes seconds
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background of a shell inherits SIGINT ignored (no KeyboardInterrupt)
    stopping = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, on_signal) for s in stopping} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        supervisor.start()
        for name, url in server.endpoints.items():
            print(f"  {name:8s} {url}", file=out)
        ready = server.ready_models()
        models = ", ".join(ready) if ready else "none: run `dyngate build` first, or name them with --models"
        print(f"  models   {models}", file=out)
        for name, reason in server.model_errors().items():
            print(f"  FAILED   {name}: {short_reason(reason)}", file=out)
        print(f"Ctrl-C stops the server; if it dies it is restarted (at most {max_restarts} times within "
              f"{restart_window_s:.0f} s).", file=out, flush=True)
        supervisor.watch()
    except KeyboardInterrupt:
        server.stop()
        print("Triton stopped", file=out, flush=True)
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
