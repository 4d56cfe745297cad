"""`dyngate`: one console command with subcommands build, serve, reload, gateway, predict, recommend, report,
bench, load, zero-report, deploy. This module is the one place that wires the packages together.

    dyngate build --model distilbert-tiny --techniques fp32,torchscript
    dyngate serve --repository model_repository
    dyngate build --model distilbert-tiny --techniques fp32 --triton 127.0.0.1:8001   # hot rebuild (gRPC)
    dyngate reload --model distilbert-tiny --variant fp32 --triton 127.0.0.1:8001
    dyngate gateway --triton 127.0.0.1:8001 --triton-http 127.0.0.1:8000   # inference over HTTP, control gRPC
    dyngate predict --model distilbert-tiny --variant fp32 --text "a gripping film"
    dyngate recommend --model distilbert-tiny --budget 1.0
    dyngate recommend --model distilbert-tiny --cascade int8-dynamic,fp32 --budget 0.5
    dyngate bench / dyngate load / dyngate zero-report
    dyngate deploy kubernetes --repository model_repository --out deploy/k8s

Every `--triton` takes Triton's address as HOST:PORT (gRPC; without a port, 8001), parsed by one function
(`dyngate_serving.client.parse_address`); only `predict` also takes http://HOST:PORT (and the gateway's
`--triton-http` is Triton's HTTP port, for inference only).
Settings also come from the environment: DYNGATE_REPOSITORY, DYNGATE_CACHE, DYNGATE_DATA.
Errors dyngate raises on purpose print as one line `error: ...` and exit with status 2. A closed stdout
(`dyngate recommend ... | head -1`) ends the command quietly with status 141, as SIGPIPE would.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import signal
import sys
from pathlib import Path

from dyngate_build.errors import ConfigError, DyngateError, InputError


def _default(env: str, fallback: str) -> str:
    return os.environ.get(env, fallback)


def parse_options(items: list[str]) -> dict[str, dict]:
    """`technique.key=value` strings -> {technique: {key: value}}; values parse as JSON when they can."""
    options: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        technique, dot, name = key.partition(".")
        if not sep or not dot or not technique or not name:
            raise ConfigError(f"--option {item!r} must look like technique.name=value (e.g. int8-static.samples=256)")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        options.setdefault(technique, {})[name] = parsed
    return options


def parse_params(items: list[str]) -> dict:
    """`key=value` request parameters -> dict (numbers and booleans parsed as JSON); ConfigError for a key that
    is not one of the parameters a served variant reads (`dyngate_build.runtime.REQUEST_PARAMETERS`)."""
    from dyngate_build.runtime import REQUEST_PARAMETERS

    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r} must look like key=value (e.g. exit_threshold=0.9)")
        if key not in REQUEST_PARAMETERS:
            raise ConfigError(f"--param {item!r}: {key!r} is no request parameter a variant reads; allowed: "
                              f"{', '.join(REQUEST_PARAMETERS)} (e.g. --param exit_threshold=0.9)")
        if key in params:  # as the gateway refuses a field given twice
            raise ConfigError(f"--param {key} is given more than once; give it once, with the value you mean")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def cmd_build(args) -> int:
    from dyngate_build.pipeline import BuildOptions, build, not_built_alike
    from dyngate_build.repository import ServingOptions
    from dyngate_build.techniques import TECHNIQUES, known_techniques

    if args.list:
        known_techniques()
        for name, technique in TECHNIQUES.items():
            print(f"{name:16s} {technique.summary}")
        return 0
    if not args.model:
        raise ConfigError("--model is required: a preset (distilbert-tiny, vit-tiny, deberta-tiny), "
                          "a checkpoint folder or a hub id")
    techniques = tuple(t.strip() for t in args.techniques.split(",") if t.strip())
    options = parse_options(args.option)
    serving = ServingOptions(**{k: v for k, v in (("threads", args.threads), ("instances", args.instances),
                                                   ("queue_delay_us", args.queue_delay_us)) if v is not None})
    builds = [BuildOptions(  # every --model checked (a misspelt preset refused) before any build starts
        model=model, techniques=techniques, technique_options=options, repository=Path(args.repository),
        cache_dir=Path(args.cache_dir), data=args.data, eval_limit=args.eval_limit or None,
        serving=serving, native=not args.no_native) for model in args.model]
    hook = None
    if args.triton:
        from dyngate_serving.client import model_control_client
        from dyngate_serving.rollout import after_publish

        client = model_control_client(args.triton)
        client.index()  # TritonUnreachable now, not after the work
        hook = after_publish(client)
    if args.skip_existing:
        skipped = [b.model for b in builds if not not_built_alike(b)]
        if skipped:
            print(f"{', '.join(skipped)}: {', '.join(techniques)} already built in {args.repository} from the same "
                  "source and serving settings; not rebuilt (`dyngate build` without --skip-existing, or `make "
                  "build`, rebuilds)")
        builds = [b for b in builds if b.model not in skipped]
    for settings in builds:
        build(settings, after_publish=hook)
    return 0


def cmd_reload(args) -> int:
    """Make a running Triton serve the newest version folder of one variant, then delete the older ones."""
    from dyngate_build.repository import CONFIG_FILE, triton_name
    from dyngate_serving.client import model_control_client
    from dyngate_serving.rollout import roll_out

    client = model_control_client(args.triton)  # a malformed or http:// address is refused first
    name = triton_name(args.model, args.variant, native=args.native)
    folder = Path(args.repository) / name
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{name} is not in the repository {args.repository} (no {folder / CONFIG_FILE}); "
                          "build it first with `dyngate build`")
    result = roll_out(client, folder, log=lambda line: None)  # one summary line instead
    print(f"{name}: Triton serves version {result.version}"
          + (f"; removed version(s) {', '.join(map(str, result.removed))}" if result.removed else ""))
    return 0


def cmd_serve(args) -> int:
    from dyngate_serving.launcher import TritonServerConfig
    from dyngate_serving.supervisor import serve_forever

    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    if len(set(ports.values())) < len(ports):
        raise ConfigError(f"{', '.join(ports)} must differ; got "
                          + ", ".join(f"{flag} {port}" for flag, port in ports.items()))
    if args.log_file is not None:
        try:  # a probe, as the launcher opens it: its folder made, the file created if missing, nothing written
            args.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(args.log_file, "ab"):
                pass
        except OSError as e:
            raise ConfigError(f"--log-file {str(args.log_file)!r}: cannot write a file there ({e.strerror}); give "
                              "the path of a file in a folder you can write") from None
    serve_forever(TritonServerConfig(
        repository=Path(args.repository), http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, host=args.host, models=args.models or None, strict=False,
        log_file=args.log_file, exit_timeout_s=args.exit_timeout),
        max_restarts=args.max_restarts, restart_window_s=args.restart_window)
    return 0


def cmd_gateway(args) -> int:
    from dyngate_gateway.app import launch
    from dyngate_serving.client import grpc_address
    from dyngate_serving.net import port_is_free

    triton = grpc_address(args.triton)
    if not Path(args.repository).is_dir():
        raise ConfigError(f"repository {args.repository} is not a folder; build one first (dyngate build --model M "
                          "--techniques ... --repository FOLDER) or pass --repository")
    if not port_is_free(args.port, args.host):
        raise ConfigError(f"port {args.port} on {args.host} is already in use; stop what listens there or "
                          "choose another with --port")
    from dataclasses import replace

    from dyngate_gateway.config import GatewayConfig

    config = GatewayConfig.load(args.config)
    if args.metrics_url:
        config = replace(config, metrics_url=args.metrics_url)
    if args.triton_http is not None:  # checked where the gateway's clients are made (ClientPool)
        config = replace(config, triton_http_url=args.triton_http)
    launch(repository=Path(args.repository), triton_url=triton, host=args.host, port=args.port, config=config)
    return 0


def read_input(args) -> bytes:
    """The raw bytes a client sends: --text as UTF-8, or the file at --image."""
    if (args.text is None) == (args.image is None):
        raise ConfigError("give exactly one of --text or --image")
    if args.text is not None:
        return args.text.encode("utf-8", "surrogateescape")  # bytes that are not UTF-8 reach the server as-is
    path = Path(args.image)
    if not path.is_file():
        raise ConfigError(f"--image {args.image!r} is not a file")
    return path.read_bytes()


def cmd_predict(args) -> int:
    from dyngate_build.repository import triton_name
    from dyngate_serving.client import TritonClient, parse_address

    raw = read_input(args)
    params = parse_params(args.param)  # refused before Triton is asked anything
    client = TritonClient(*parse_address(args.triton, args.protocol, "--triton"))
    name = triton_name(args.model, args.variant)
    expected = client.model_input_name(name)
    given = "TEXT" if args.text is not None else "IMAGE"
    if expected != given:
        flag = "--text" if expected == "TEXT" else "--image"
        raise ConfigError(f"{name} takes {'text' if expected == 'TEXT' else 'an image'}; use {flag}")
    result = client.predict(name, raw, params)
    print(json.dumps({"model": result.model, "latency_ms": round(result.latency_ms, 3), **result.answer},
                     indent=2, ensure_ascii=False))
    return 0


def cmd_report(args) -> int:
    from dyngate_measure.report import markdown, options_from_args, run_report

    options = options_from_args(args)
    report = run_report(options)
    print(markdown(report))
    print(f"written: {options.out / 'report.md'}, {options.out / 'report.json'} and the PNG charts", file=sys.stderr)
    return 0


def cmd_recommend(args) -> int:
    """Print the fastest variant measured on this machine whose dev metric is within --budget points of FP32;
    with --cascade, the cascade threshold for the target (--budget points below the last variant, or
    --at-least) and the share of requests that escalate, from the build's per-example dev scores. No variant or
    threshold that qualifies is a ConfigError (exit 2): a script gets no answer, so it must not read success."""
    from dyngate_build.repository import python_variants_by_model
    from dyngate_measure.recommend import (DEFAULT_BUDGET_PT, cascade_from_repository, cascade_order_warning,
                                           recommend_from_repository)

    # the flags' own checks first, named as the user typed them (found in a trial: within_pt=-1.0, at_least=80.0)
    if args.at_least is not None and not args.cascade:
        raise ConfigError("--at-least sets a cascade target: give --cascade CHEAP,EXPENSIVE with it (without "
                          "--cascade, --budget sets how far below FP32 the fastest variant may be)")
    if args.budget is not None and not (args.budget >= 0 and args.budget != float("inf")):
        raise ConfigError(f"--budget {args.budget:g} must be a number of points ≥ 0 (1.0 = one point of the dev "
                          "metric below the reference)")
    if args.at_least is not None and not 0 <= args.at_least <= 1:
        raise ConfigError(f"--at-least {args.at_least:g} must be in [0, 1]: the dev metric the cascade must reach, "
                          "e.g. 0.80 (not 80)")
    if args.at_least is not None and args.budget is not None:
        # one target per cascade, as choose_cascade_threshold takes it: refused rather than one silently ignored
        raise ConfigError(f"--budget {args.budget:g} and --at-least {args.at_least:g} are two accuracy targets; "
                          "give one: --budget (points below the cascade's last variant) or --at-least (an absolute "
                          "dev metric)")
    budget = DEFAULT_BUDGET_PT if args.budget is None else args.budget
    if args.cascade:
        order = [v.strip() for v in args.cascade.split(",")]
        if not all(order):
            raise ConfigError(f"--cascade {args.cascade!r} has an empty variant name; give the variants cheapest "
                              "first, separated by commas, e.g. --cascade int8-dynamic,fp32")
        within = None if args.at_least is not None else budget
        choice = cascade_from_repository(Path(args.repository), args.model, order, within, args.at_least)
        warning = cascade_order_warning(python_variants_by_model(Path(args.repository), [args.model])[args.model],
                                        order)
        if warning:  # a warning, not an error: the p50s are measurements, and any order is a valid cascade
            print(f"warning: {warning}", file=sys.stderr)
        if choice.threshold is None:  # no answer for the target asked: an error, as a script expects
            raise ConfigError(f"{choice.explain()}: {_reachable_target(choice, args.at_least is not None)}")
        print(choice.explain())
        return 0
    recommendation = recommend_from_repository(Path(args.repository), args.model, budget)
    if recommendation.chosen is None:
        raise ConfigError(recommendation.explain())
    print(recommendation.explain())
    return 0


def _reachable_target(choice, absolute: bool) -> str:
    """The flag and value that `dyngate recommend --cascade` can reach, from the best threshold `choice` found
    (rounded towards what it reaches: 4 decimals down for --at-least, 2 up for --budget points)."""
    if absolute:
        reachable = math.floor(choice.metric * 1e4 + 1e-6) / 1e4
        return f"give --at-least {reachable:.4f} or lower"
    points = math.ceil((choice.alone[choice.order[-1]] - choice.metric) * 1e4 - 1e-6) / 1e2
    return f"give --budget {points:.2f} or more (points below {choice.order[-1]})"


def cmd_bench(args) -> int:
    from dyngate_measure.benchmark import markdown, options_from_args, run_bench

    print(markdown(run_bench(options_from_args(args))))
    return 0


def cmd_load(args) -> int:
    from dyngate_gateway.config import GatewayConfig
    from dyngate_measure.load_test import run_from_args

    # the gateway's login, read as `dyngate gateway` reads it: DYNGATE_GATEWAY_USER / DYNGATE_GATEWAY_PASSWORD,
    # else the config file's "auth" (--gateway-config, else $DYNGATE_GATEWAY_CONFIG)
    auth = GatewayConfig.load(args.gateway_config).auth if args.gateway else None
    return run_from_args(args, args.command_line, gateway_auth=auth)


def cmd_zero_report(args) -> int:
    from dyngate_measure.zero_report import run_from_args

    return run_from_args(args)


def cmd_deploy(args) -> int:
    from dyngate_deploy.kubernetes import options_from_args, write_kubernetes

    write_kubernetes(options_from_args(args), log=lambda line: print(line, file=sys.stderr))
    return 0


def tcp_port(text: str) -> int:
    """argparse type for a port flag: an integer in [1, 65535], else argparse's error naming the flag."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; use an integer in [1, 65535]")
    return port


def whole_number(minimum: int, unit: str = "", maximum: int | None = None):
    """argparse type for a count or duration flag: an integer in [`minimum`, `maximum`] (`unit` ends the error,
    e.g. "seconds")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            bounds = f"≥ {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer {bounds}" + (f" ({unit})" if unit else ""))
        return value
    return parse


def positive_seconds(text: str) -> float:
    """argparse type for a time window: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def make_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from dyngate_build import __version__

    parser = argparse.ArgumentParser(prog="dyngate", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"dyngate {__version__}",
                        help="print dyngate's version (the one build metadata records as dyngate_version) and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    repository = _default("DYNGATE_REPOSITORY", "model_repository")

    p = sub.add_parser("build", help="build variants of a model into the Triton model repository")
    p.add_argument("--model", action="append", help="preset name, checkpoint folder or hub id (repeatable)")
    p.add_argument("--techniques", default="fp32,torchscript", help="comma-separated technique names")
    p.add_argument("--option", action="append", default=[], metavar="TECHNIQUE.NAME=VALUE",
                   help="a technique option (repeatable)")
    p.add_argument("--repository", default=repository)
    p.add_argument("--cache-dir", default=_default("DYNGATE_CACHE", ".cache"))
    p.add_argument("--data", default=None, help="data folder or hf:<datasets id> (default: $DYNGATE_DATA, "
                                                "else ../shared/data)")
    p.add_argument("--eval-limit", type=whole_number(0), default=1000, help="dev examples for the metric (0 = all)")
    p.add_argument("--threads", type=whole_number(1), default=None,
                   help="intra-op threads per model instance (default: from the machine's cores)")
    p.add_argument("--instances", type=whole_number(1), default=None,
                   help="Triton model instances per variant (default: from the machine's cores)")
    p.add_argument("--queue-delay-us", type=whole_number(0, "microseconds"), default=None,
                   help="dynamic batching window in microseconds (default 0: a lone request never waits)")
    p.add_argument("--no-native", action="store_true", help="skip the native (NVIDIA container) flavour")
    p.add_argument("--skip-existing", action="store_true",
                   help="build nothing for a model whose requested variants are all in the repository, built from "
                        "the same source with the same serving settings by this dyngate (make demo uses it)")
    p.add_argument("--list", action="store_true", help="list the techniques and exit")
    p.add_argument("--triton", "--triton-url", dest="triton", default=None, metavar="HOST:PORT",
                   help="a running Triton's gRPC address (e.g. 127.0.0.1:8001): load the rebuilt variants there "
                        "(new version in, old one out once the new is ready) and delete the old version folders; "
                        "an http:// URL is refused (an HTTP load stalls HTTP inference on other models)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("serve", help="start the embedded Triton Inference Server on the repository")
    p.add_argument("--repository", default=repository)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=tcp_port, default=8000)
    p.add_argument("--grpc-port", type=tcp_port, default=8001)
    p.add_argument("--metrics-port", type=tcp_port, default=8002)
    p.add_argument("--models", nargs="*", help="models to load (default: every python-backend model)")
    p.add_argument("--max-restarts", type=whole_number(0), default=3,
                   help="restart a Triton that died at most this many times within --restart-window (0: never)")
    p.add_argument("--restart-window", type=positive_seconds, default=300.0, metavar="SECONDS",
                   help="the window --max-restarts counts in (default 300 s)")
    p.add_argument("--exit-timeout", type=whole_number(0, "seconds", maximum=3600), default=5, metavar="SECONDS",
                   help="on Ctrl-C/SIGTERM, how long Triton lets in-flight requests finish (--exit-timeout-secs; "
                        "default 5). An idle keep-alive HTTP client, e.g. the gateway with --triton-http, holds a "
                        "stop for all of it")
    p.add_argument("--log-file", type=Path, default=None, metavar="PATH",
                   help="Triton's log, kept after the stop (written anew by each serve; a restart within one serve "
                        "appends to it); default: a temporary file, removed after a clean stop (Ctrl-C, SIGTERM) and "
                        "kept, its path printed, when Triton fails to start or dies")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("reload", help="make a running Triton serve a variant's newest version, remove the old")
    p.add_argument("--model", required=True, help="model name in the repository (e.g. distilbert-tiny)")
    p.add_argument("--variant", required=True, help="variant name (e.g. fp32)")
    p.add_argument("--native", action="store_true", help="the native flavour (<model>__<variant>__native)")
    p.add_argument("--repository", default=repository)
    p.add_argument("--triton", "--triton-url", dest="triton", default="127.0.0.1:8001", metavar="HOST:PORT",
                   help="Triton's gRPC address (model control over gRPC; an http:// URL is refused)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("gateway", help="start the Gradio gateway in front of a running Triton")
    p.add_argument("--repository", default=repository)
    p.add_argument("--triton", "--triton-url", dest="triton", default="127.0.0.1:8001", metavar="HOST:PORT",
                   help="Triton's gRPC address (port default 8001; an http:// URL is refused)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=tcp_port, default=7860)
    p.add_argument("--config", help="gateway JSON config: limits, routing, login (default: "
                                    "$DYNGATE_GATEWAY_CONFIG)")
    p.add_argument("--metrics-url", help="Triton's Prometheus metrics URL (default: the gRPC port + 1)")
    p.add_argument("--triton-http", metavar="[http://]HOST:PORT",
                   help="Triton's HTTP endpoint: inference goes there (less time per request than gRPC: "
                        "scripts/bench_gateway.py), model control stays on --triton (default: all over gRPC)")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("predict", help="send one input to a variant through Triton")
    p.add_argument("--model", required=True)
    p.add_argument("--variant", default="fp32")
    p.add_argument("--text")
    p.add_argument("--image")
    p.add_argument("--triton", "--url", dest="triton", default="127.0.0.1:8001", metavar="[SCHEME://]HOST:PORT",
                   help="Triton's address: gRPC HOST:PORT (port default 8001) or http://HOST:PORT (default 8000); "
                        "--url is an alias")
    p.add_argument("--protocol", choices=("grpc", "http"), default=None,
                   help="default: from the address's scheme (http://, grpc://), else grpc")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="request parameter")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("recommend", help="the fastest variant built on this machine within an accuracy budget "
                                         "of FP32, and why (from the build's metadata)")
    p.add_argument("--model", required=True, help="model name in the repository (e.g. distilbert-tiny)")
    p.add_argument("--budget", type=float, default=None,
                   help="points of the dev metric the variant may lose against FP32 (default 1.0); with "
                        "--cascade, against the cascade's last variant (not with --at-least: one target)")
    p.add_argument("--cascade", metavar="CHEAP,...,EXPENSIVE",
                   help="choose the cascade policy's threshold for these variants (cheapest first) from the dev "
                        "scores the build stored: the lowest one within --budget (or --at-least), and the share "
                        "of requests that escalate")
    p.add_argument("--at-least", type=float, default=None, metavar="METRIC",
                   help="with --cascade: an absolute dev metric to reach instead of --budget (e.g. 0.80)")
    p.add_argument("--repository", default=repository)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("report", help="measure every variant through Triton: Markdown, JSON and PNG charts")
    from dyngate_measure.report import add_arguments as add_report_arguments

    add_report_arguments(p)
    p.set_defaults(func=cmd_report)

    # bench and load import torch (through dyngate_build.evaluate): their options are added only when that
    # subcommand is the one run, so `dyngate --help` and the other subcommands start fast
    chosen = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    measures = {"bench": ("benchmark", cmd_bench, "variants in process and through Triton beside PyTorch and "
                                                  "ONNX Runtime baselines, interleaved: bench.md and bench.json"),
                "load": ("load_test", cmd_load, "N concurrent clients for T seconds against Triton and the "
                                                "gateway: load.md and load.json"),
                "zero-report": ("zero_report", cmd_zero_report, "per-rank memory at DeepSpeed ZeRO stages 0-3 "
                                                                "(2 ranks, CPU)")}
    for name, (module, func, text) in measures.items():
        p = sub.add_parser(name, help=text)
        if name == chosen:
            importlib.import_module(f"dyngate_measure.{module}").add_arguments(p)
        if name == chosen == "load":
            p.add_argument("--gateway-config", default=None, metavar="FILE",
                           help="the gateway's JSON config, for its login (\"auth\"), as `dyngate gateway --config` "
                                "(default: $DYNGATE_GATEWAY_CONFIG); DYNGATE_GATEWAY_USER and "
                                "DYNGATE_GATEWAY_PASSWORD win over it, as for the gateway")
        p.set_defaults(func=func)
    p = sub.add_parser("deploy", help="Kubernetes manifests (Kustomize base + cpu/gpu overlays) for the repository")
    if chosen == "deploy":  # like bench and load: its options are added only when it is the one run
        importlib.import_module("dyngate_deploy.kubernetes").add_arguments(p)
    p.set_defaults(func=cmd_deploy)
    return parser


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: staging folders and temporary files are removed


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = make_parser(argv).parse_args(argv)
    args.command_line = "dyngate " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        # the reader went away (`dyngate recommend ... | head -1`): stop quietly. Python's recipe (docs of the
        # signal module, "Note on SIGPIPE"): point stdout at devnull so the last flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # what a shell reports for a program a closed pipe stopped
    except InputError as e:
        print(f"error: bad input: {e}", file=sys.stderr)
        return 2
    except DyngateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

