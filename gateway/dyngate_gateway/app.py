"""The dyngate gateway: a Gradio app in front of a running Triton that serves a dyngate model repository.

Layout only: the handlers live in gateway/dyngate_gateway/handlers.py, routing.py, compare.py, metrics.py and
models_view.py; the plain HTTP routes in api.py, the ASGI middleware in middleware.py.
One `gr.Tab` per view; add a view by adding a `_<view>_tab(...)` function and calling it inside `build_app`.

Views:
- Predict: pick a model, type text (text models) or upload an image (image models), tick variants, Predict:
  each variant's answer drawn side by side (entities highlighted in the text, class probabilities as bars, the
  image with its prediction; answers_view.py), a summary table and the raw JSON (folded away). Opens on a
  text-classification model. "Route by policy" sends the
  same input through one routing policy (gateway/dyngate_gateway/routing.py) and shows who served it and why;
  the cascade threshold can be chosen from an accuracy target on the dev split (the build's per-example dev
  scores, dyngate_measure.recommend.choose_cascade_threshold), shown with the share of requests that escalate.
- Compare: benchmark chosen variants live against Triton (requests, concurrency levels, batch, dev inputs); the
  dev metric against the p50 just measured at the lowest concurrency level and, beside it, at the highest, each
  with its Pareto front, size as marker area and the recommended variant for an accuracy budget the user sets
  (dyngate_measure.recommend, as `dyngate recommend`, on the lowest level's p50).
- Metrics: Triton's Prometheus metrics, the server process, the machine and the GPU, refreshed by a timer.
- Models: the served variants with technique, size, dev metric, build p50, threads × instances and Triton's
  state (load and unload); the native flavours apart, as "for NVIDIA's container; not loadable here".
- Shadow: mirror a share of a model's routed requests to a candidate variant in the background (shadow.py);
  its agreement with the served answers and its latency per minute.
A status line on top (refreshed by a timer) says whether Triton is reachable: down, restarting, or ready (or that
the address given is the wrong protocol's port, and which to give).

API endpoints (gradio_client, by name):
- "predict": (model, text, image file or None, variants) -> (table {headers, data}, {variant: answer})
- "route": (model, text, image file or None, policy, variant, accuracy_budget, threshold, exit_threshold)
  -> {"served_by", "route", "reason", "answer", ...}
- "compare": (model, variants, requests, concurrency "1,2,4", batch size) -> (table, server split table,
  distribution plot, throughput plot, CSV file, JSON file)
- "metrics": () -> (summary Markdown, per-model table, CPU plot, memory plot, snapshot JSON)
- "models": () -> table; "load_model" / "unload_model": (triton model) -> (message, table)
- "model_info": (model) -> the page's updates for that model (variant choices, description, inputs)
- "cascade_threshold": (model, points below the most expensive variant) -> (threshold, explanation Markdown)
- "triton_status": () -> the status line (is Triton reachable, which variants are loaded)

Plain HTTP (same server): POST /api/predict with JSON {"model", "text" | "image_base64", "policy", "variant",
"accuracy_budget", "threshold", "exit_threshold"} -> the route answer; bad input -> 400 {"error": ...},
unknown model -> 404, a body over limits.max_body_bytes (any route) -> 413, Triton down -> 503.
GET /api/status, GET /api/models, GET /api/shadow (?model=M: shadow traffic counts), GET /api/cascade
(?model=M&within_pt=0.5 or &at_least=0.8: the cascade threshold for that target), GET /metrics (the gateway's
Prometheus metrics, dyngate_gateway/telemetry.py). With a login, every route but Gradio's login page asks for it.

    dyngate gateway --repository model_repository --triton 127.0.0.1:8001     # http://127.0.0.1:7860
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd

from dyngate_build.errors import DyngateError, InputError, ServingError
from dyngate_gateway import answers_view, compare, handlers, metrics, models_view, telemetry
from dyngate_gateway.api import create_app
from dyngate_gateway.config import DEFAULT_HOST, DEFAULT_PORT, GatewayConfig
from dyngate_gateway.handlers import RESULT_HEADERS, ClientPool, ModelView
from dyngate_gateway.routing import POLICIES, Router
from dyngate_gateway.shadow import DEFAULT_QUEUE_LIMIT, Shadow
from dyngate_gateway.telemetry import GatewayTelemetry
from dyngate_measure.recommend import CascadeChoice, cascade_steps, choose_cascade_threshold

TITLE = "dyngate gateway"
CASCADE_TARGET_PT = 0.5  # the Predict tab's accuracy target for choosing a cascade threshold (points)


def _table(rows: list[list] | None = None) -> pd.DataFrame:
    rows = [["" if cell is None else cell for cell in row] for row in rows or []]
    return pd.DataFrame(rows, columns=RESULT_HEADERS)


def _predict_tab(catalog: dict[str, ModelView], clients: ClientPool, state: "GatewayState"):
    """The Predict view: one input to several variants of one model, answers side by side.

    Returns (on_model, model dropdown, its outputs) so the page can narrow the variants on load."""
    first = answers_view.default_model(catalog)
    with gr.Tab("Predict", id="predict"):
        with gr.Row():
            model = gr.Dropdown(choices=list(catalog), value=first.name if first else None, label="Model",
                                elem_id="model", scale=1)
            # choices: every known variant name, so API calls for any model pass Gradio's own check; the page
            # narrows them to the selected model's variants on load and on every model change
            variants = gr.CheckboxGroup(choices=handlers.all_variant_names(catalog),
                                        value=first.variant_names if first else [], label="Variants",
                                        elem_id="variants", scale=2)
        info = gr.Markdown(first.describe() if first else "No models: run `dyngate build` first.",
                           elem_id="model-info")
        text = gr.Textbox(label="Text", lines=3, placeholder=answers_view.placeholder(first),
                          visible=first.is_text if first else True, elem_id="text")
        with gr.Row(visible=bool(first and not first.is_text)) as image_row:
            image = gr.File(label=f"Image ({handlers.IMAGE_FORMATS_TEXT})", file_types=["image"], type="filepath",
                            elem_id="image")
            preview = gr.Image(label="Preview", interactive=False, height=160, elem_id="preview")
        predict = gr.Button("Predict", variant="primary", elem_id="predict")
        drawn = gr.State(None)  # {"task", "text", "image", "answers": {variant: answer}, "latency": {variant: ms}}

        @gr.render(inputs=drawn)
        def draw(value):
            if not value:
                return
            with gr.Row(equal_height=False, elem_id="drawn"):
                for variant, answer in value["answers"].items():
                    with gr.Column(min_width=240, elem_id=f"answer-{variant}", elem_classes=["drawn-answer"]):
                        gr.Markdown(answers_view.headline(variant, answer, value["latency"].get(variant)))
                        if answer.get("error"):
                            continue
                        if value["task"] == answers_view.TOKEN_CLASSIFICATION:
                            gr.HighlightedText(answers_view.highlighted_entities(value["text"], answer),
                                               label="entities", show_legend=False, show_inline_category=True,
                                               elem_classes=["drawn-entities"])
                            continue
                        if value["image"]:
                            gr.Image(value["image"], label=answer.get("label"), height=140, interactive=False,
                                     elem_classes=["drawn-image"])
                        gr.Label(answers_view.label_confidences(answer), label="class probabilities",
                                 num_top_classes=answers_view.TOP_CLASSES, elem_classes=["drawn-label"])

        table = gr.Dataframe(value=_table(), headers=RESULT_HEADERS, label="Answers", interactive=False,
                             wrap=True, elem_id="answers")
        with gr.Accordion("Raw JSON answers", open=False, elem_id="raw-accordion"):
            raw = gr.JSON(label="Raw answers (by variant)", elem_id="raw")
        with gr.Accordion("Route by policy", open=True):
            with gr.Row():
                policy = gr.Dropdown(choices=list(POLICIES), value="fastest", label="Policy", elem_id="policy")
                route_variant = gr.Dropdown(choices=handlers.all_variant_names(catalog), value=None,
                                            label="Variant (policy 'variant')", elem_id="route-variant")
                budget = gr.Number(value=state.config.routing.accuracy_budget, label="Accuracy budget (points)",
                                   elem_id="budget")
                threshold = gr.Number(value=state.config.routing.cascade_threshold,
                                      label="Cascade threshold (top-1)", elem_id="threshold")
                # a Textbox, not a Number: blank must mean "the variant's default" (a Number sends 0)
                exit_threshold = gr.Textbox(value="", label="Exit threshold (early-exit variants; blank: default)",
                                            placeholder="e.g. 0.9", elem_id="exit-threshold")
            with gr.Row():
                # no `minimum`: Gradio's own bound check fails with a traceback; choose_cascade_threshold's
                # ConfigError reaches the page as a message instead, and blank means the default
                cascade_target = gr.Number(value=CASCADE_TARGET_PT, label="Cascade: accuracy target (points below "
                                           f"the most expensive variant, on the dev split; blank: {CASCADE_TARGET_PT})",
                                           elem_id="cascade-target")
                cascade_choose = gr.Button("Choose the threshold from dev data", elem_id="cascade-choose")
            cascade_line = gr.Markdown(elem_id="cascade-line")
            route = gr.Button("Route", elem_id="route")
            route_line = gr.Markdown(elem_id="route-line")
            route_json = gr.JSON(label="Routed answer", elem_id="route-json")

    def on_model(name: str | None):
        view = catalog.get(name or "")
        if view is None:
            return (gr.update(choices=[], value=[]), "Pick a model.", gr.update(), gr.update())
        return (gr.update(choices=view.variant_names, value=view.variant_names), view.describe(),
                gr.update(visible=view.is_text, placeholder=answers_view.placeholder(view)),
                gr.update(visible=not view.is_text))

    @handlers.user_errors
    async def on_predict(name: str | None, text_value: str | None, image_path: str | None,
                         chosen: list[str] | None):
        state.refresh()
        view = catalog.get(name or "")
        if view is None:
            raise handlers.InputError(f"unknown model {name!r}; the repository's models are: "
                                      f"{', '.join(catalog) or 'none (run dyngate build)'}")
        start = time.perf_counter()
        try:
            result = await handlers.compare_variants(clients, view, text_value, image_path, chosen,
                                                     limits=state.config.limits)
        except DyngateError as e:
            state.telemetry.failed(view, "compare", e, time.perf_counter() - start)
            raise
        state.telemetry.compared(view, result, time.perf_counter() - start)
        drawing = {"task": view.task, "text": text_value, "image": None if view.is_text else image_path,
                   "answers": result.answers, "latency": {row[0]: row[4] for row in result.rows}}
        return _table(result.rows), result.answers, drawing

    def on_image(path: str | None):
        return handlers.image_preview(path)

    @handlers.user_errors
    async def on_route(name, text_value, image_path, policy_value, variant_value, budget_value, threshold_value,
                       exit_value):
        state.refresh()
        view = state.router.view(name)
        return await state.telemetry.routed(view, policy_value, lambda: state.router.aroute(
            view.name, text_value if view.is_text else None, policy_value, variant=variant_value or None,
            accuracy_budget=budget_value, threshold=threshold_value, exit_threshold=exit_value,
            image=None if view.is_text else image_path))

    def route_summary(answer):
        if not answer:
            return ""
        steps = " → ".join(f"`{s['variant']}` ({s['confidence']:.3f})" for s in answer["route"])
        line = (f"**served by `{answer['served_by']}`**: {answer['prediction']} · route {steps} · "
                f"{answer['latency_ms']:.2f} ms  \n{answer['reason']}")
        if answer.get("arms"):
            line += "\n\n" + answers_view.arms_table(answer["arms"])
        return line

    @handlers.user_errors
    def on_cascade_target(name, within_pt):
        choice = state.cascade_choice(name, within_pt=CASCADE_TARGET_PT if within_pt is None else float(within_pt))
        line = choice.explain().replace("\n", "  \n")
        return (choice.threshold if choice.threshold is not None else gr.update()), line

    # show_progress hidden: it answers at once, and a bad target would cover the threshold field with an "Error" badge
    cascade_choose.click(on_cascade_target, [model, cascade_target], [threshold, cascade_line],
                         api_name="cascade_threshold", show_progress="hidden")
    route.click(on_route, [model, text, image, policy, route_variant, budget, threshold, exit_threshold],
                route_json, api_name="route").then(route_summary, route_json, route_line,
                                                    api_visibility="private")

    outputs = [variants, info, text, image_row]
    model.change(on_model, model, outputs, api_name="model_info")
    gr.on([model.change], lambda: (_table(), None, None), None, [table, raw, drawn], api_visibility="private")
    image.change(on_image, image, preview, api_visibility="private")
    predict.click(on_predict, [model, text, image, variants], [table, raw, drawn], api_name="predict")
    text.submit(on_predict, [model, text, image, variants], [table, raw, drawn], api_visibility="private")
    return on_model, model, outputs



# ----------------------------------------------------------------------------------------------- compare

def _compare_tab(catalog: dict[str, ModelView], state: "GatewayState"):
    first = answers_view.default_model(catalog)
    limits = state.config.limits
    with gr.Tab("Compare", id="compare"):
        gr.Markdown("Benchmark variants live against Triton on real dev inputs (batch items cycle through the "
                    f"dev set). Caps: ≤{limits.max_bench_requests} requests, concurrency ≤"
                    f"{limits.max_bench_concurrency}, batch ≤{limits.max_bench_batch}.")
        with gr.Row():
            model = gr.Dropdown(choices=list(catalog), value=first.name if first else None, label="Model",
                                elem_id="cmp-model")
            variants = gr.CheckboxGroup(choices=handlers.all_variant_names(catalog),
                                        value=first.variant_names if first else [], label="Variants",
                                        elem_id="cmp-variants")
        with gr.Row():
            requests = gr.Number(value=50, precision=0, label="Requests per variant and level", elem_id="cmp-requests")
            levels = gr.Textbox(value="1,2", label="Concurrency levels (threads)", elem_id="cmp-concurrency")
            batch = gr.Number(value=1, precision=0, label="Batch size", elem_id="cmp-batch")
        with gr.Row():
            run = gr.Button("Run benchmark", variant="primary", elem_id="cmp-run")
            budget = gr.Number(value=1.0, minimum=0, label="Accuracy budget (points below FP32) for the "
                               "recommendation", elem_id="cmp-budget")
        measured = gr.State(None)  # {"model", "rows"} of the last run: the chart is redrawn when the budget changes
        # the panels' own titles say what each draws (the label would cover the first one)
        pareto = gr.Plot(label="Accuracy vs p50 at the lowest concurrency (batch 1 by default) and at the highest: "
                         "Pareto front, marker area = size, ★ recommended", show_label=False, elem_id="cmp-pareto")
        recommendation = gr.Markdown(elem_id="cmp-recommendation")
        table = gr.Dataframe(headers=compare.HEADERS, label="Latency and throughput", interactive=False,
                             elem_id="cmp-table")
        server = gr.Dataframe(headers=compare.SERVER_HEADERS, label="Server-side split per request "
                              "(Triton statistics API)", interactive=False, elem_id="cmp-server")
        with gr.Row():
            dist = gr.LinePlot(x="percentile", y="ms", color="run", title="Latency distribution (ms by percentile)",
                               elem_id="cmp-dist")
            thr = gr.LinePlot(x="concurrency", y="throughput", color="variant",
                              title="Throughput (items/s) vs concurrency", elem_id="cmp-thr")
        with gr.Row():
            csv_file = gr.File(label="CSV", elem_id="cmp-csv")
            json_file = gr.File(label="JSON", elem_id="cmp-json")

    def on_model(name):
        view = catalog.get(name or "")
        names = view.variant_names if view else []
        return gr.update(choices=names, value=names)

    @handlers.user_errors
    def on_run(name, chosen, n_requests, level_text, batch_size, progress=gr.Progress()):
        view = state.router.view(name)
        chosen = handlers.check_variants(view, chosen)
        level_list = compare.parse_levels(level_text)
        n_requests, batch_size = int(n_requests or 0), int(batch_size or 0)
        compare.check_settings(n_requests, level_list, batch_size, limits)
        raws = state.dev_inputs(view)
        progress(0, desc="starting")
        result = compare.run_benchmark(state.clients.url, state.clients.protocol,
                                       {v: view.variants[v].name for v in chosen}, raws, n_requests, level_list,
                                       batch_size, progress=lambda f, text: progress(f, desc=text))
        if all(r[4] == r[3] for r in result.rows):
            first_error = next(iter(result.errors.values()), ["?"])[0]
            raise ServingError(f"every benchmark request failed: {first_error}")
        settings = {"model": view.name, "variants": chosen, "requests": n_requests, "concurrency": level_list,
                    "batch_size": batch_size, "inputs": f"{len(raws)} dev inputs", "triton": state.clients.url}
        folder = Path(tempfile.mkdtemp(prefix="compare-", dir=state.scratch.name))
        (folder / "benchmark.csv").write_text(result.csv())
        (folder / "benchmark.json").write_text(compare.to_json(result, settings))
        rows = pd.DataFrame(result.rows, columns=compare.HEADERS)
        thr_df = pd.DataFrame({"variant": rows["variant"], "concurrency": rows["concurrency"],
                               "throughput": rows["throughput items/s"]})
        return (rows, pd.DataFrame(result.server, columns=compare.SERVER_HEADERS),
                pd.DataFrame(compare.distribution(result), columns=["run", "percentile", "ms"]), thr_df,
                str(folder / "benchmark.csv"), str(folder / "benchmark.json"),
                {"model": view.name, "rows": result.rows})

    @handlers.user_errors
    def on_draw(last, budget_pt):
        import matplotlib.pyplot as plt

        from dyngate_measure.recommend import metric_name
        from dyngate_measure.report import pareto_figure

        if not last:
            return None, ""
        view = state.router.view(last["model"])
        if budget_pt is None or budget_pt < 0:
            raise InputError(f"budget={budget_pt!r}: give the accuracy points the recommendation may lose, ≥ 0")
        metas, metric = {v: e.metadata for v, e in view.variants.items()}, metric_name(list(view.variants.values()))
        run_levels = compare.levels(last["rows"])
        chosen = compare.tradeoff(metas, last["rows"], float(budget_pt), metric, level=run_levels[0])
        more = []
        if len(run_levels) > 1:  # the same variants at the run's highest concurrency, beside the lone requests
            loaded = compare.tradeoff(metas, last["rows"], float(budget_pt), metric, level=run_levels[-1])
            more.append((loaded, f"at concurrency {run_levels[-1]} (★ recommended at {run_levels[0]})",
                         f"p50 ms ({loaded.latency})"))
        figure = pareto_figure(chosen, f"{view.name}: {chosen.metric_name} vs p50, concurrency {run_levels[0]}",
                               f"p50 ms ({chosen.latency})", more)
        plt.close(figure)  # Gradio renders it; pyplot need not keep it
        return figure, "```\n" + chosen.explain() + "\n```"

    model.change(on_model, model, variants, api_visibility="private")
    run.click(on_run, [model, variants, requests, levels, batch],
              [table, server, dist, thr, csv_file, json_file, measured], api_name="compare",
              concurrency_limit=1).then(on_draw, [measured, budget], [pareto, recommendation],
                                        api_visibility="private")
    budget.change(on_draw, [measured, budget], [pareto, recommendation], api_visibility="private")
    return on_model, model, variants  # run again on every page load: variants built since the gateway started


# ----------------------------------------------------------------------------------------------- metrics

def _metrics_tab(state: "GatewayState"):
    with gr.Tab("Metrics", id="metrics") as tab:
        gr.Markdown(f"Triton metrics from `{state.monitor.metrics_url}`, refreshed every "
                    f"{state.config.metrics_interval_s:g} s.")
        summary = gr.Markdown(elem_id="metrics-summary")
        table = gr.Dataframe(headers=metrics.MODEL_HEADERS, label="Per model (cumulative)", interactive=False,
                             elem_id="metrics-table")
        with gr.Row():
            cpu = gr.LinePlot(x="seconds", y="value", color="series", title="CPU %", elem_id="metrics-cpu")
            memory = gr.LinePlot(x="seconds", y="value", color="series", title="Server RSS MB and requests/s",
                                 elem_id="metrics-memory")
        gateway_table = gr.Dataframe(headers=telemetry.REQUEST_HEADERS, interactive=False,
                                     label="Gateway requests (this replica; the counters GET /metrics serves)",
                                     elem_id="metrics-gateway")
        snapshot = gr.JSON(label="Last sample", elem_id="metrics-json", visible=False)
        refresh = gr.Button("Refresh metrics", visible=False, elem_id="metrics-refresh")
        timer = gr.Timer(state.config.metrics_interval_s, active=False)  # ticks while this tab is open

    def on_tick():
        sample = state.monitor.sample()
        server, machine, gpu = sample["server"], sample["machine"], sample["gpu"]
        lines = []
        if sample["error"]:
            lines.append(f"⚠️ {sample['error']}")
        lines.append(f"**Server process** pid {server['pid'] or '?'} (+{server['children']} model stubs): CPU "
                     f"{_fmt(server['cpu_pct'])} % · RSS {_fmt(server['rss_mb'])} MB")
        lines.append(f"**Machine**: CPU {machine['cpu_pct']:.1f} % of {machine['cpus']} cores · memory "
                     f"{machine['memory_used_mb']:.0f} / {machine['memory_total_mb']:.0f} MB")
        if isinstance(gpu, str):
            lines.append(f"**GPU**: {gpu}")
        else:
            lines += [f"**GPU {g['gpu']}**: {g['utilization_pct']} % · {g['memory_used_mb']:.0f} / "
                      f"{g['memory_total_mb']:.0f} MB · {_fmt(g['power_w'])} W" for g in gpu]
        rate = sample["requests_per_s"]
        lines.append(f"**Requests/s** (all models): {_fmt(rate)}")
        history = list(state.monitor.history)
        t0 = history[0]["time"] if history else 0
        cpu_rows, mem_rows = [], []
        for h in history:
            t = round(h["time"] - t0, 1)
            for series, key, rows in (("server", "server_cpu", cpu_rows), ("machine", "machine_cpu", cpu_rows),
                                      ("server RSS MB", "server_rss_mb", mem_rows),
                                      ("requests/s", "requests_per_s", mem_rows)):
                if h[key] is not None:
                    rows.append({"seconds": t, "value": float(h[key]), "series": series})
        columns = ["seconds", "value", "series"]
        public = {k: v for k, v in sample.items() if k != "triton_gpu"}
        return ("  \n".join(lines), pd.DataFrame(metrics.model_rows(sample["models"]), columns=metrics.MODEL_HEADERS),
                pd.DataFrame(cpu_rows, columns=columns), pd.DataFrame(mem_rows, columns=columns), public,
                pd.DataFrame(state.telemetry.request_rows(), columns=telemetry.REQUEST_HEADERS))

    outputs = [summary, table, cpu, memory, snapshot, gateway_table]
    timer.tick(on_tick, None, outputs, api_visibility="private", show_progress="hidden")
    tab.select(on_tick, None, outputs, api_visibility="private", show_progress="hidden")
    refresh.click(on_tick, None, outputs, api_name="metrics")
    return timer


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


# ------------------------------------------------------------------------------------------------ models

def _models_tab(state: "GatewayState"):
    python_models = [e.name for v in state.catalog.values() for e in v.variants.values()]
    with gr.Tab("Models", id="models"):
        table = gr.Dataframe(headers=models_view.HEADERS, label="Served variants (python backend)",
                             interactive=False, wrap=True, column_widths=models_view.COLUMN_WIDTHS,
                             elem_id="models-table")
        with gr.Row():
            name = gr.Dropdown(choices=python_models, value=python_models[0] if python_models else None,
                               label="Triton model", elem_id="models-name")
            load = gr.Button("Load", elem_id="models-load")
            unload = gr.Button("Unload", elem_id="models-unload")
            refresh = gr.Button("Refresh", elem_id="models-refresh")
        message = gr.Markdown(elem_id="models-message")
        native = models_view.native_rows(state.repository)
        gr.Dataframe(value=pd.DataFrame(native, columns=models_view.NATIVE_HEADERS), headers=models_view.NATIVE_HEADERS,
                     label=f"Native flavour: {models_view.NATIVE_NOTE} (the same graphs for the onnxruntime and "
                           "pytorch backends of NVIDIA's tritonserver)", interactive=False, wrap=True,
                     column_widths=models_view.NATIVE_COLUMN_WIDTHS, visible=bool(native), elem_id="models-native")

    def rows():
        return pd.DataFrame(models_view.model_rows(state.repository, state.clients), columns=models_view.HEADERS)

    def act(action):
        @handlers.user_errors
        def handler(model_name):
            text = models_view.control(state.clients, state.repository, model_name, action)
            state.router.ready_models(fresh=True)
            return text, rows()
        return handler

    refresh.click(rows, None, table, api_name="models")
    load.click(act("load"), name, [message, table], api_name="load_model", concurrency_limit=1)
    unload.click(act("unload"), name, [message, table], api_name="unload_model", concurrency_limit=1)
    return rows, table


# ------------------------------------------------------------------------------------------------ shadow

def _shadow_tab(catalog: dict[str, ModelView], state: "GatewayState"):
    """The Shadow view: mirror a share of a model's routed requests to a candidate variant (shadow.py) and watch
    its agreement with the served answers and its latency, per minute. Returns its refresh timer and (on_model,
    model, outputs) for the page load."""
    first = answers_view.default_model(catalog)
    with gr.Tab("Shadow", id="shadow"):
        gr.Markdown("Mirror a share of a model's **routed** requests (the Route button, `POST /api/predict`) to a "
                    "candidate variant in the background: answers are never changed or delayed; copies beyond the "
                    "queue limit are dropped. Off until started. Also `GET /api/shadow`.")
        with gr.Row():
            model = gr.Dropdown(choices=list(catalog), value=first.name if first else None, label="Model",
                                elem_id="shadow-model")
            candidate = gr.Dropdown(choices=handlers.all_variant_names(catalog),
                                    value=first.variant_names[-1] if first else None, label="Candidate variant",
                                    elem_id="shadow-candidate")
            share = gr.Number(value=0.1, minimum=0, maximum=1, label="Share of requests mirrored (0-1]",
                              elem_id="shadow-share")
            limit = gr.Number(value=DEFAULT_QUEUE_LIMIT, precision=0, label="Queue limit",
                              elem_id="shadow-limit")
        with gr.Row():
            start = gr.Button("Start shadow", variant="primary", elem_id="shadow-start")
            stop = gr.Button("Stop", elem_id="shadow-stop")
        summary = gr.Markdown(elem_id="shadow-summary")
        table = gr.Dataframe(headers=SHADOW_HEADERS, label="Per minute (UTC)", interactive=False,
                             elem_id="shadow-table")
        timer = gr.Timer(state.config.metrics_interval_s, active=False)  # ticks while this tab is open

    def view_of(name):
        return state.router.view(name)

    def show(name):
        stats = state.shadow.stats(name)["models"].get(name or "")
        if stats is None:
            return f"No shadow for `{name}`: pick a candidate and start one.", pd.DataFrame(columns=SHADOW_HEADERS)
        t = stats["totals"]
        line = (f"**{'on' if stats['enabled'] else 'off'}** · `{name}` → candidate `{stats['candidate']}` · share "
                f"{stats['share']:g} · routed {stats['seen']} · mirrored {t['mirrored']} · top-1 agreement "
                f"{_pct(t['top1_agreement'])} · max |Δ| {_num(t['max_abs_delta'])}"
                + (f" · entity F1 {_num(t['entity_f1'])}" if t["entity_f1"] is not None else "")
                + f" · candidate p50 {_num(t['candidate_p50_ms'])} ms (served {_num(t['served_p50_ms'])} ms) · "
                f"errors {t['errors']} · dropped {t['dropped']} · queued {stats['queued']}/{stats['queue_limit']}")
        if stats["last_error"]:
            line += f"  \nlast candidate error: {stats['last_error']}"
        rows = [[m["minute"], m["mirrored"], m["top1_agreement"], m["max_abs_delta"], m["entity_f1"],
                 m["served_p50_ms"], m["candidate_p50_ms"], m["candidate_p99_ms"], m["errors"], m["dropped"]]
                for m in stats["minutes"]]
        return line, pd.DataFrame(rows, columns=SHADOW_HEADERS)

    def on_model(name):
        view = catalog.get(name or "")
        names = view.variant_names if view else []
        return gr.update(choices=names, value=names[-1] if names else None), *show(name)

    @handlers.user_errors
    def on_start(name, candidate_name, share_value, limit_value):
        state.shadow.configure(view_of(name), candidate_name, share_value, limit_value)
        return show(name)

    @handlers.user_errors
    def on_stop(name):
        state.shadow.stop(view_of(name).name)
        return show(name)

    outputs = [summary, table]
    model.change(on_model, model, [candidate, *outputs], api_visibility="private")
    start.click(on_start, [model, candidate, share, limit], outputs, api_name="shadow_start")
    stop.click(on_stop, model, outputs, api_name="shadow_stop")
    timer.tick(show, model, outputs, api_visibility="private", show_progress="hidden")
    return timer, (on_model, model, [candidate, *outputs])  # the page load runs on_model: variants built since


SHADOW_HEADERS = ["minute", "mirrored", "top-1 agreement", "max |Δ| score", "entity F1", "served p50 ms",
                  "candidate p50 ms", "candidate p99 ms", "errors", "dropped"]


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


# ------------------------------------------------------------------------------------------------- state

@dataclass
class GatewayState:
    """What the handlers of one gateway share."""

    repository: Path
    catalog: dict[str, ModelView]
    clients: ClientPool
    router: Router
    monitor: metrics.MetricsMonitor
    config: GatewayConfig
    telemetry: GatewayTelemetry = field(default_factory=GatewayTelemetry)  # GET /metrics
    shadow: Shadow | None = None

    def __post_init__(self):
        # the Compare tab's downloads, one folder per run (Gradio copies them into its cache, `delete_cache`): removed
        # with the gateway (TemporaryDirectory's finalizer at exit), not left in the temp folder after each run
        self.scratch = tempfile.TemporaryDirectory(prefix="dyngate-gateway-")
        self._dev: dict[str, list[bytes]] = {}
        self._dev_lock = threading.Lock()
        self._fingerprint = handlers.repository_fingerprint(self.repository)
        self._refresh_lock = threading.Lock()

    def refresh(self) -> None:
        """Pick up variants built (or removed) since the gateway started: the catalog is re-read when the
        repository's model folders or their metadata changed. Called before each API answer and status tick."""
        fingerprint = handlers.repository_fingerprint(self.repository)
        if fingerprint == self._fingerprint:
            return
        with self._refresh_lock:
            if fingerprint != self._fingerprint:
                handlers.refresh_catalog(self.catalog, self.repository)
                self._fingerprint = fingerprint

    def dev_inputs(self, view: ModelView, limit: int = 200) -> list[bytes]:
        """Real dev inputs for `view`'s task (dyngate_build.data.load_examples with the configured data setting)."""
        from dyngate_build.data import DataSource, load_examples

        with self._dev_lock:
            if view.task not in self._dev:
                try:
                    examples, _ = load_examples(view.task, "dev", DataSource.from_setting(self.config.data), limit)
                except DyngateError as e:
                    raise InputError(f"no dev inputs for {view.task}: {e}") from e
                self._dev[view.task] = [ex.raw for ex in examples]
            return self._dev[view.task]

    def cascade_choice(self, model: str | None, within_pt: float | None = None,
                       at_least: float | None = None) -> CascadeChoice:
        """The `cascade` threshold for an accuracy target (dyngate_measure.recommend.choose_cascade_threshold) on
        the chain the policy runs for `model` now: its READY variants cheapest first (every variant when Triton
        cannot be asked), from the dev scores the build stored: one small file per variant, no inference."""
        self.refresh()
        view = self.router.view(model)
        try:
            ready = self.router.ready_models()
        except ServingError:
            ready = None
        order = self.router.cascade_order(view, ready)
        return choose_cascade_threshold(cascade_steps(list(view.variants.values()), order), within_pt, at_least)

    def status(self) -> tuple[bool, str]:
        self.refresh()
        return handlers.triton_status(self.clients, self.catalog)


def build_app(repository: Path, triton_url: str, config: GatewayConfig | None = None) -> gr.Blocks:
    """The gateway page for `repository`, answered by the Triton at `triton_url` (gRPC "host:port", or a url
    with a grpc:// or http:// scheme). Models are read from the repository here and again whenever a build
    changes it (GatewayState.refresh: the API and the status line see new variants; the page's dropdowns keep
    the choices the gateway started with). The shared state is `demo.dyngate` (a GatewayState)."""
    config = config or GatewayConfig.load()
    catalog = handlers.load_catalog(Path(repository))
    clients = ClientPool(triton_url, infer_url=config.triton_http_url)
    router = Router(catalog, clients, config.routing, config.limits)
    monitor = metrics.MetricsMonitor(config.metrics_url or metrics.default_metrics_url(triton_url), config.server_pid)
    router.shadow = Shadow(clients)  # off until a model's shadow is started (Shadow tab, API "shadow_start")
    state = GatewayState(Path(repository), catalog, clients, router, monitor, config, shadow=router.shadow)
    state.telemetry.watch_shadow(router.shadow)
    # delete_cache: the files Gradio keeps for the page (uploads, Compare downloads) older than an hour, hourly, and
    # all of this app's at shutdown (Gradio's resource-cleanup guide)
    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# {TITLE}\nModel repository `{repository}` · Triton `{clients.url}`")
        status = gr.Markdown(elem_id="triton-status")
        with gr.Tabs() as tabs:
            on_model, model, model_outputs = _predict_tab(catalog, clients, state)
            compare_model = _compare_tab(catalog, state)
            metrics_timer = _metrics_tab(state)
            models_rows, models_table = _models_tab(state)
            shadow_timer, shadow_model = _shadow_tab(catalog, state)

        def on_tab(evt: gr.SelectData):
            return gr.Timer(active=evt.value == "Metrics"), gr.Timer(active=evt.value == "Shadow")

        tabs.select(on_tab, None, [metrics_timer, shadow_timer], api_visibility="private")

        def on_status():
            return state.status()[1]

        demo.load(on_status, None, status, api_name="triton_status")
        gr.Timer(config.status_interval_s).tick(on_status, None, status, api_visibility="private",
                                                show_progress="hidden")
        demo.load(on_model, model, model_outputs, api_visibility="private")
        for tab_on_model, tab_model, tab_outputs in (compare_model, shadow_model):
            demo.load(tab_on_model, tab_model, tab_outputs, api_visibility="private")
        demo.load(models_rows, None, models_table, api_visibility="private")
    demo.dyngate = state
    return demo


class RunningGateway:
    """A gateway served by uvicorn in a background thread (tests, notebooks); `close()` stops it."""

    def __init__(self, demo: gr.Blocks, host: str, port: int):
        import uvicorn

        self.demo, self.host, self.port = demo, host, port
        self.url = f"http://{host}:{port}"
        self.app = create_app(demo, host, port)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, timeout_s: float = 30) -> "RunningGateway":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServingError(f"the gateway did not start on {self.url}")
            time.sleep(0.05)
        return self

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.state.scratch.cleanup()

    @property
    def state(self) -> GatewayState:
        return self.demo.dyngate


def serve(repository: Path, triton_url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          config: GatewayConfig | None = None) -> RunningGateway:
    """Build the gateway and serve it (page + JSON routes) in a background thread; returns the running handle."""
    return RunningGateway(build_app(repository, triton_url, config), host, port).start()


def launch(repository: Path, triton_url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
           config: GatewayConfig | None = None, **kwargs):
    """Build the gateway and serve it on host:port (127.0.0.1 by default) until interrupted."""
    import uvicorn

    demo = build_app(repository, triton_url, config)
    print(f"dyngate gateway on http://{host}:{port} (JSON: POST /api/predict)", flush=True)
    uvicorn.run(create_app(demo, host, port), host=host, port=port, log_level="warning", **kwargs)
