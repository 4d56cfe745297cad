"""Load test: N concurrent clients for T seconds against Triton (asyncio gRPC) and the gateway's JSON route.

    dyngate load --triton 127.0.0.1:8001 --gateway http://127.0.0.1:7860 \
        --model distilbert-tiny --variant fp32 --clients 100 --duration 60 --out reports      # or: make load

The targets take turns: `rounds` rounds of duration/rounds seconds each, the order rotating every round (Triton,
gateway; gateway, Triton; ...), so a machine that gets busier or quieter during the run weighs on both alike; each
target's rounds add up to its row, and the report gives the gateway's throughput and p99 as ratios to Triton's.
Each turn: `clients` asyncio tasks, each its own client (a `tritonclient.grpc.aio` channel for
Triton; an aiohttp session with one kept-alive connection each for the gateway's `POST /api/predict` with policy
"variant"), sending one
real dev input per request (SST-2 / CoNLL sentences, digits PNGs; `--data` as for `dyngate build`) back to back
until `duration` seconds have passed or `max_requests` were sent. A request that fails or takes longer than
`timeout` seconds counts as an error (its first messages are kept). Latency is the client's round trip; p50/p90/p99
come from dyngate_build.evaluate.summarize_ms like every other dyngate measurement.

Triton's statistics API is read before and after each run: the deltas of `inference_count` (items),
`execution_count` (model executions) and the success count (requests) of the variant. batching ratio =
inference_count / execution_count: 1.0 means every request ran alone; 8 means dynamic batching merged eight
requests per execution on average.

A gateway started with a login (README: DYNGATE_GATEWAY_USER / DYNGATE_GATEWAY_PASSWORD, or the config file's
"auth") is sent that login as HTTP basic auth (`gateway_auth`; `dyngate load` reads it as `dyngate gateway` does);
a gateway that refuses the login given, or asks for one when none was, is a ConfigError before the run.

Only loopback servers are accepted (127.0.0.0/8, localhost, ::1): this tool must not load someone else's server.
Writes `<out>/<name>.json` and `<out>/<name>.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from dyngate_build.errors import ConfigError, InputError, ServingError
from dyngate_build.evaluate import summarize_ms
from dyngate_serving.client import TritonClient, grpc_address
from dyngate_serving.endpoints import protocol_mismatch
from dyngate_serving.net import DIRECT

TARGETS = ("triton", "gateway")
MAX_ERROR_MESSAGES = 10
FALLBACK_TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "an instant classic",
                  "the plot makes no sense", "warm, funny and wise", "I walked out after twenty minutes"]


@dataclass
class LoadRun:
    """The outcome of one target's run. Times in ms, throughput in requests/s, counts of requests."""

    target: str
    url: str
    triton_model: str
    clients: int
    duration_s: float
    max_requests: int
    rounds: int = 1
    wall_s: float = 0.0
    requests: int = 0
    ok: int = 0
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    throughput_rps: float = 0.0
    triton: dict = field(default_factory=dict)  # deltas of Triton's statistics for triton_model

    def summarize(self, times: list[float]) -> None:
        """Fill p50/p90/p99/mean (ms, 3 decimals, dyngate_build.evaluate.summarize_ms; None without answers) and
        throughput_rps (answers / wall_s) from `times`, the answered requests' round trips in ms."""
        if times:
            lat = summarize_ms(times)
            self.p50_ms, self.p90_ms, self.p99_ms, self.mean_ms = (round(lat.p50_ms, 3), round(lat.p90_ms, 3),
                                                                   round(lat.p99_ms, 3), round(lat.mean_ms, 3))
        self.throughput_rps = round(len(times) / self.wall_s, 2) if self.wall_s > 0 else 0.0


def check_loopback(url: str, what: str) -> str:
    """The host of `url` ("host:port" or "scheme://host:port") if it is a loopback address, else ConfigError."""
    parsed = urlparse(url if "://" in url else f"//{url}")
    host = parsed.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"{what}={url!r}: the load test only targets servers on this machine (127.0.0.1, "
                          "localhost, ::1); start dyngate serve / dyngate gateway locally")
    return host


def check_bounds(clients: int, duration_s: float, max_requests: int, timeout_s: float, rounds: int = 1) -> None:
    """ConfigError unless 1 ≤ clients ≤ 1000, 0 < duration_s ≤ 3600, max_requests ≥ 1, timeout_s > 0,
    1 ≤ rounds ≤ 100."""
    if not 1 <= rounds <= 100:
        raise ConfigError(f"rounds={rounds} is outside [1, 100]")
    if not 1 <= clients <= 1000:
        raise ConfigError(f"clients={clients} is outside [1, 1000]")
    if not 0 < duration_s <= 3600:
        raise ConfigError(f"duration={duration_s} s is outside (0, 3600]")
    if max_requests < 1:
        raise ConfigError(f"max_requests={max_requests} must be ≥ 1")
    if timeout_s <= 0:
        raise ConfigError(f"timeout={timeout_s} s must be > 0")


def check_gateway_login(gateway_url: str, auth: tuple[str, str] | None, timeout_s: float = 10.0) -> None:
    """ConfigError when the gateway at `gateway_url` answers 401 to its status route (`GET /api/status`, no
    inference) with the login `auth` (user, password; None: none); a gateway that cannot be reached is left to
    the run, which counts its failed requests."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(gateway_url.rstrip("/") + "/api/status")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        DIRECT.open(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as e:
        if e.code == 401:
            said = f"refused the login of user {auth[0]!r}" if auth else "asks for a login and none was given"
            raise ConfigError(f"gateway={gateway_url!r} {said} (HTTP 401); give the gateway's login as for "
                              "`dyngate gateway`: DYNGATE_GATEWAY_USER and DYNGATE_GATEWAY_PASSWORD in the "
                              "environment, or --gateway-config with the config file that holds its \"auth\"") from None
    except OSError:
        pass


def load_inputs(client_input: str, data: str | None, limit: int = 200) -> list[bytes]:
    """Real dev inputs: UTF-8 sentences (text models) or PNG bytes (image models); a built-in list as fallback."""
    if client_input == "IMAGE":
        from dyngate_build.data import encode_png, load_digit_images

        images, _ = load_digit_images("dev", limit=limit)
        return [encode_png(image) for image in images]
    try:
        from dyngate_build.data import DataSource, load_examples

        examples, _ = load_examples("text-classification", "dev", DataSource.from_setting(data), limit)
        texts = [ex.raw for ex in examples if ex.raw.strip()]
        if texts:
            return texts
    except Exception as e:  # no data folder here: the run still measures the server, on fixed sentences
        print(f"note: no dev sentences ({e}); using {len(FALLBACK_TEXTS)} built-in ones", file=sys.stderr)
    return [t.encode() for t in FALLBACK_TEXTS]


# ------------------------------------------------------------------------------------------------ Triton

STAT_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


def triton_stats(client: TritonClient, model: str) -> dict[str, int]:
    """Triton's cumulative statistics of `model` (its statistics API, gRPC or HTTP), summed over its versions:
    inference_count (items inferred), execution_count (model executions), success (requests answered) and, per
    phase of STAT_PHASES, the time Triton spent in it, `<phase>_ns` (ns, summed over requests)."""
    out = {"inference_count": 0, "execution_count": 0, "success": 0, **{f"{p}_ns": 0 for p in STAT_PHASES}}
    for entry in client.statistics(model).get("model_stats", []):
        inference = entry.get("inference_stats") or {}
        out["inference_count"] += int(entry.get("inference_count", 0) or 0)
        out["execution_count"] += int(entry.get("execution_count", 0) or 0)
        out["success"] += int((inference.get("success") or {}).get("count", 0) or 0)
        for phase in STAT_PHASES:
            out[f"{phase}_ns"] += int((inference.get(phase) or {}).get("ns", 0) or 0)
    return out


def settled_stats(client: TritonClient, model: str, before: dict, answered: int, counted: str = "inference_count",
                  wait_s: float = 2.0) -> dict:
    """triton_stats once Triton's `counted` count has grown by `answered` since `before` (or after `wait_s` s):
    Triton records a request when it releases it, which can be just after the client has its answer, so read at
    once the last request or two of a run may be missing. counted: "inference_count" (items; the gateway merges
    concurrent requests into fewer Triton requests, each answer is still one item) or "success" (requests, for a
    client that sends its own batches). Polls every 50 ms. The one wait for the load test and the Compare tab."""
    deadline = time.monotonic() + wait_s
    while True:
        after = triton_stats(client, model)
        if after[counted] - before[counted] >= answered or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def stats_delta(before: dict, after: dict) -> dict:
    """Deltas of two triton_stats snapshots plus batching_ratio and mean queue / compute ms per request."""
    return _stats_summary({k: after[k] - before[k] for k in before})


def _stats_summary(delta: dict) -> dict:
    requests = delta["success"]
    return {"inference_count": delta["inference_count"], "execution_count": delta["execution_count"],
            "success_count": requests,
            "batching_ratio": round(delta["inference_count"] / delta["execution_count"], 3)
            if delta["execution_count"] else None,
            "queue_ms_mean": round(delta["queue_ns"] / 1e6 / requests, 3) if requests else None,
            "compute_infer_ms_mean": round(delta["compute_infer_ns"] / 1e6 / requests, 3) if requests else None}


async def _drive(send_factory, clients: int, duration_s: float, max_requests: int, timeout_s: float,
                 run: LoadRun) -> list[float]:
    """`clients` workers, each `send = await send_factory()` then `await send(i)` back to back until the time or
    request budget is spent. Fills run's counts and latencies; returns the list of round trips (ms)."""
    times: list[float] = []
    messages: dict[str, None] = {}
    counter = {"sent": 0, "errors": 0}
    deadline = time.monotonic() + duration_s

    async def worker():
        send, close = await send_factory()
        try:
            while time.monotonic() < deadline and counter["sent"] < max_requests:
                index = counter["sent"]
                counter["sent"] += 1
                start = time.perf_counter()
                try:
                    await asyncio.wait_for(send(index), timeout_s)
                    times.append((time.perf_counter() - start) * 1000)
                except Exception as e:  # counted; the run goes on
                    counter["errors"] += 1
                    text = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (over {timeout_s} s?)"
                    if len(messages) < MAX_ERROR_MESSAGES:
                        messages.setdefault(text[:300])
        finally:
            await close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    run.wall_s = round(time.perf_counter() - started, 3)
    run.requests, run.errors, run.ok = counter["sent"], counter["errors"], len(times)
    run.error_messages = list(messages)
    run.summarize(times)
    return times


async def _model_signature(client, model: str, address: str) -> tuple[str, list[str]]:
    try:
        meta = await client.get_model_metadata(model, as_json=True)
    except Exception as e:
        wrong_port = await asyncio.to_thread(protocol_mismatch, address, "grpc")
        if wrong_port:
            raise ConfigError(f"--triton {address}: {wrong_port}") from e
        raise ServingError(f"model {model!r} is not ready on Triton: {e}") from e
    inputs = meta.get("inputs") or []
    if len(inputs) != 1 or inputs[0].get("datatype") != "BYTES":
        raise ServingError(f"model {model!r} is not a dyngate python-backend variant (one BYTES input)")
    return inputs[0]["name"], [o["name"] for o in meta.get("outputs") or []]


async def run_target(target: str, triton_url: str, gateway_url: str | None, model: str, variant: str,
                     raws: list[bytes], clients: int, duration_s: float, max_requests: int,
                     timeout_s: float, warmup: int = 5, gateway_auth: tuple[str, str] | None = None
                     ) -> tuple[LoadRun, list[float], dict]:
    """One target's run ("triton" or "gateway") with Triton's statistics before and after: (the run, its round
    trips in ms, the raw deltas of Triton's counts, for `combine`). gateway_auth: (user, password) sent to the
    gateway as HTTP basic auth."""
    import numpy as np
    import tritonclient.grpc.aio as grpcaio

    triton_model = f"{model}__{variant}"
    control = grpcaio.InferenceServerClient(triton_url)
    stats_client = TritonClient(triton_url, "grpc", timeout_s=timeout_s)
    try:
        input_name, outputs = await _model_signature(control, triton_model, triton_url)

        if target == "triton":
            url = triton_url

            async def factory():
                client = grpcaio.InferenceServerClient(triton_url)
                requested = [grpcaio.InferRequestedOutput(n) for n in outputs]

                async def send(i: int):
                    data = np.array([[raws[i % len(raws)]]], dtype=np.object_)
                    tensor = grpcaio.InferInput(input_name, [1, 1], "BYTES")
                    tensor.set_data_from_numpy(data)
                    await client.infer(triton_model, [tensor], outputs=requested)

                return send, client.close
        else:
            import aiohttp

            url = gateway_url.rstrip("/")
            key = "text" if input_name == "TEXT" else "image_base64"
            bodies = [json.dumps({"model": model, key: raw.decode() if key == "text" else base64.b64encode(raw).decode(),
                                  "policy": "variant", "variant": variant}).encode() for raw in raws]

            async def factory():
                # One session with one kept-alive connection per worker. (httpx cost this generator 6-20 ms of
                # CPU a request at 32 clients: its shared pool scans every connection per request and, without
                # sniffio installed, it retries an import on every request; the run measured the generator.)
                session = aiohttp.ClientSession(
                    url, connector=aiohttp.TCPConnector(limit=1), trust_env=False,
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                    auth=aiohttp.BasicAuth(*gateway_auth) if gateway_auth else None)

                async def send(i: int):
                    async with session.post("/api/predict", data=bodies[i % len(bodies)],
                                            headers={"content-type": "application/json"}) as response:
                        text = await response.read()
                        if response.status != 200:
                            raise ServingError(f"HTTP {response.status}: {text[:200].decode(errors='replace')}")

                return send, session.close

        run = LoadRun(target=target, url=url, triton_model=triton_model, clients=clients, duration_s=duration_s,
                      max_requests=max_requests)
        if warmup:
            await _drive(factory, 1, duration_s, warmup, timeout_s, LoadRun(target, url, triton_model, 1, 0, 0))
        # Triton's statistics through one blocking client, read in a thread (one at a time) off the event loop
        before = await asyncio.to_thread(triton_stats, stats_client, triton_model)
        times = await _drive(factory, clients, duration_s, max_requests, timeout_s, run)
        after = await asyncio.to_thread(settled_stats, stats_client, triton_model, before, run.ok)
        run.triton = stats_delta(before, after)
        return run, times, {k: after[k] - before[k] for k in before}
    finally:
        stats_client.close()
        await control.close()


def combine(parts: list[tuple[LoadRun, list[float], dict]]) -> LoadRun:
    """One target's row from its rounds (`run_target` results): requests, errors and wall time added, p50/p90/p99
    over every round trip, throughput = answered / wall, Triton's count deltas added."""
    first = parts[0][0]
    run = LoadRun(first.target, first.url, first.triton_model, first.clients,
                  round(sum(p[0].duration_s for p in parts), 3), first.max_requests, rounds=len(parts))
    times = [t for p in parts for t in p[1]]
    run.wall_s = round(sum(p[0].wall_s for p in parts), 3)
    run.requests, run.ok, run.errors = (sum(p[0].requests for p in parts), len(times),
                                        sum(p[0].errors for p in parts))
    run.error_messages = list(dict.fromkeys(m for p in parts for m in p[0].error_messages))[:MAX_ERROR_MESSAGES]
    run.summarize(times)
    run.triton = _stats_summary({k: sum(p[2][k] for p in parts) for k in parts[0][2]})
    return run


def run_load(triton_url: str, model: str, variant: str = "fp32", gateway_url: str | None = None,
             targets: tuple[str, ...] = TARGETS, clients: int = 100, duration_s: float = 60,
             max_requests: int = 1_000_000, timeout_s: float = 30, data: str | None = None,
             rounds: int = 3, gateway_auth: tuple[str, str] | None = None) -> list[LoadRun]:
    """Run the targets in turn, `rounds` rounds of duration_s / rounds seconds each (see the module docstring);
    returns one LoadRun per target (its rounds combined). max_requests caps each target's total.
    gateway_auth: the gateway's login (user, password), sent as HTTP basic auth; None for a gateway without one.

    Raises ConfigError for a non-loopback url, an unknown target, a missing gateway url, bounds out of range or a
    gateway that answers 401 (`check_gateway_login`); ServingError when the variant is not ready on Triton.
    """
    check_bounds(clients, duration_s, max_requests, timeout_s, rounds)
    triton_url = grpc_address(triton_url)  # "host:port"; ConfigError for an http:// URL or a malformed address
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ConfigError(f"targets={list(targets)}: choose from {', '.join(TARGETS)}")
    check_loopback(triton_url, "triton")
    if "gateway" in targets:
        if not gateway_url:
            raise ConfigError("target 'gateway' needs --gateway http://127.0.0.1:PORT (or leave it out of --targets)")
        if not gateway_url.startswith("http://"):
            raise ConfigError(f"gateway={gateway_url!r} needs its scheme: http://HOST:PORT, e.g. http://127.0.0.1:7860")
        check_loopback(gateway_url, "gateway")
        check_gateway_login(gateway_url, gateway_auth, timeout_s)

    async def main():
        import tritonclient.grpc.aio as grpcaio

        probe = grpcaio.InferenceServerClient(triton_url)
        try:
            input_name, _ = await _model_signature(probe, f"{model}__{variant}", triton_url)
        finally:
            await probe.close()
        raws = load_inputs(input_name, data)
        parts: dict[str, list] = {t: [] for t in targets}
        for r in range(rounds):
            shift = r % len(targets)
            for target in targets[shift:] + targets[:shift]:
                left = max_requests - sum(p[0].requests for p in parts[target])
                if left > 0:
                    parts[target].append(await run_target(target, triton_url, gateway_url, model, variant, raws,
                                                          clients, duration_s / rounds, left, timeout_s,
                                                          warmup=5 if r == 0 else 0, gateway_auth=gateway_auth))
        return [combine(parts[t]) for t in targets]

    return asyncio.run(main())


# ------------------------------------------------------------------------------------------------ report

HEADERS = ["target", "clients", "duration s", "requests", "errors", "p50 ms", "p99 ms", "throughput req/s",
           "Triton inferences", "executions", "batching ratio"]


def markdown(runs: list[LoadRun], command: str) -> str:
    lines = ["# dyngate load test", "", f"`{command}`", "", "| " + " | ".join(HEADERS) + " |",
             "|" + " --- |" * len(HEADERS)]
    for r in runs:
        cells = [r.target, r.clients, r.wall_s, r.requests, r.errors, r.p50_ms, r.p99_ms, r.throughput_rps,
                 r.triton.get("inference_count"), r.triton.get("execution_count"), r.triton.get("batching_ratio")]
        lines.append("| " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    by_target = {r.target: r for r in runs}
    triton, gateway = by_target.get("triton"), by_target.get("gateway")
    if triton and gateway and triton.throughput_rps and triton.p99_ms and gateway.p99_ms is not None:
        lines += ["", f"Gateway against direct Triton, same run: throughput "
                      f"{gateway.throughput_rps / triton.throughput_rps:.0%} of Triton's, p99 "
                      f"×{gateway.p99_ms / triton.p99_ms:.2f} Triton's."]
    rounds = max(r.rounds for r in runs)
    lines += ["", f"The targets took turns in {rounds} round(s), the order rotating; each row adds "
                  "up its target's rounds. batching ratio = Triton inference_count / execution_count for the variant "
                  "over the run (1.0: no merging; higher: dynamic batching merged requests). Latency: client round "
                  "trip."]
    for r in runs:
        if r.error_messages:
            lines += ["", f"Errors ({r.target}): " + "; ".join(f"`{m}`" for m in r.error_messages)]
    return "\n".join(lines) + "\n"


def report_folder(out: Path) -> Path:
    """Create the report folder `out` (parents too) before a run, so a folder that cannot be written is refused
    before the run rather than losing it: ConfigError naming --out and the reason. The one place it is made."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: the report cannot be written there ({e.strerror}); give a writable "
                          "folder") from None
    return out


def write_report(runs: list[LoadRun], out: Path, name: str = "load", command: str = "") -> tuple[Path, Path]:
    """Write `<out>/<name>.json` and `<out>/<name>.md` into the folder `report_folder` made; returns both paths."""
    json_path, md_path = Path(out) / f"{name}.json", Path(out) / f"{name}.md"
    json_path.write_text(json.dumps({"command": command, "runs": [asdict(r) for r in runs]}, indent=2))
    md_path.write_text(markdown(runs, command))
    return json_path, md_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dyngate load`."""
    parser.add_argument("--triton", "--triton-url", dest="triton", default="127.0.0.1:8001", metavar="HOST:PORT",
                        help="Triton's gRPC address on this machine (port default 8001; an http:// URL is refused)")
    parser.add_argument("--gateway", default=None, help="gateway url, e.g. http://127.0.0.1:7860 (loopback)")
    parser.add_argument("--targets", default=None, help="comma-separated: triton,gateway (default: triton, plus "
                                                         "gateway when --gateway is given)")
    parser.add_argument("--model", default="distilbert-tiny")
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=60, help="seconds per target (all its rounds)")
    parser.add_argument("--rounds", type=int, default=3, help="turns per target, the order rotating each round")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="cap on requests per target")
    parser.add_argument("--timeout", type=float, default=30, help="seconds before a request counts as an error")
    parser.add_argument("--data", default=None, help="data folder for dev inputs (default: $DYNGATE_DATA, else "
                                                     "../shared/data)")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--name", default="load", help="report file name without extension")


def run_from_args(args, command: str, gateway_auth: tuple[str, str] | None = None) -> int:
    """Run the load test the parsed options describe, print and write its report; exit status 1 when any
    request failed. Raises ConfigError/InputError/ServingError. `command`: the command line, for the report.
    gateway_auth: the gateway's login (user, password) or None (see `run_load`)."""
    out = report_folder(args.out)  # before the run, not after it: a report that cannot be written would lose it
    targets = tuple(t.strip() for t in (args.targets or ("triton,gateway" if args.gateway else "triton")).split(",")
                    if t.strip())
    runs = run_load(args.triton, args.model, args.variant, args.gateway, targets, args.clients, args.duration,
                    args.max_requests, args.timeout, args.data, args.rounds, gateway_auth)
    json_path, md_path = write_report(runs, out, args.name, command)
    print(markdown(runs, command))
    print(f"written: {json_path}, {md_path}", file=sys.stderr)
    return 1 if any(r.errors for r in runs) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyngate_measure.load_test", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    command = "python -m dyngate_measure.load_test " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        return run_from_args(args, command)
    except (ConfigError, InputError, ServingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
