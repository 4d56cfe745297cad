"""The Models tab: the served variants (python backend) with technique, size, dev metric, build p50, threads and
instances and Triton's state, loading/unloading through Triton's model-control API (the server runs with
explicit model control); apart from them, the native flavours, shown as what they are: for NVIDIA's container,
not loadable by the embedded server.
"""

from __future__ import annotations

import time
from pathlib import Path

from dyngate_build.errors import InputError, ServingError
from dyngate_build.repository import list_models, version_numbers
from dyngate_serving.client import TritonClient, short_reason
from dyngate_gateway.handlers import STATUS_TIMEOUT_S, ClientPool

HEADERS = ["triton model", "model", "variant", "technique", "size MB", "dev metric", "build p50 ms",
           "serving", "state", "version", "reason"]
NATIVE_HEADERS = ["triton model", "model", "variant", "platform", "size MB", "dev metric", "serving"]
# Column widths (share of the table) with wrapped cells: without them Gradio sizes columns to their longest cell and
# both tables scroll sideways at 1280 px
COLUMN_WIDTHS = ["16%", "10%", "9%", "9%", "6%", "9%", "6%", "14%", "7%", "7%", "7%"]
NATIVE_COLUMN_WIDTHS = ["24%", "12%", "10%", "14%", "7%", "12%", "21%"]
NATIVE_NOTE = "for NVIDIA's container; not loadable here"
CONTROL_TIMEOUT_S = 180.0
SETTLE_S = 30.0  # loading a torch variant on a busy 2-core machine takes a while


def repository_index(clients: ClientPool) -> dict[str, list[dict]]:
    """Triton's repository index by model name: one entry per version Triton knows (a model it never loaded has
    one bare entry). ServingError when Triton is unreachable."""
    with TritonClient(clients.url, clients.protocol, timeout_s=STATUS_TIMEOUT_S) as client:
        models = client.index()
    by_name: dict[str, list[dict]] = {}
    for m in models:
        by_name.setdefault(m["name"], []).append(m)
    return by_name


def served_state(entries: list[dict]) -> str:
    """One model's state from its index entries: READY when a version is served, else the newest version's."""
    if any(e.get("state") == "READY" for e in entries):
        return "READY"
    versioned = [e for e in entries if str(e.get("version") or "").isdigit()]
    newest = max(versioned, key=lambda e: int(e["version"])) if versioned else (entries[0] if entries else {})
    return newest.get("state") or "UNAVAILABLE"


def variant_state(folder: Path, entries: list[dict]) -> tuple[str, str, str]:
    """(state, version, reason) of one model folder as Triton serves it.

    state: READY (a version is served; `version` says which, and names a newer one on disk that Triton has not
    loaded yet), FAILED (the newest version on disk failed to load;
    when an older version is still READY, Triton keeps serving it and `version` says so), LOADING, UNLOADING or
    UNAVAILABLE (not loaded). reason: Triton's load error (without its traceback) for FAILED, else "".
    Failures of versions no longer on disk are history and ignored.
    """
    on_disk = version_numbers(folder)
    newest = on_disk[-1] if on_disk else None
    versions = {int(e["version"]): e for e in entries if str(e.get("version") or "").isdigit()}
    ready = sorted(v for v, e in versions.items() if e.get("state") == "READY")
    latest = versions.get(newest, {})
    failed = (latest.get("state") == "UNAVAILABLE" and latest.get("reason") not in (None, "", "unloaded"))
    if failed and (not ready or ready[-1] < newest):
        version = f"{newest} failed; serving {ready[-1]}" if ready else f"{newest} failed"
        return "FAILED", version, short_reason(latest["reason"])
    if ready:
        version = str(ready[-1])
        if newest is not None and newest > ready[-1]:
            version += f" ({newest} on disk, not loaded)"
        return "READY", version, ""
    state = served_state(entries) if entries else "UNAVAILABLE"
    return state, "" if newest is None else f"{newest} on disk", ""


def _dev_metric(meta) -> str | None:
    """"accuracy 0.8300" / "entity_f1 0.8841" from a VariantMetadata (None without metadata)."""
    return f"{meta.accuracy.name} {meta.accuracy.value:.4f}" if meta else None


def model_rows(repository: Path, clients: ClientPool) -> list[list]:
    """One row per served model folder (HEADERS; python backend, the flavour this Triton loads): the build's
    numbers from metadata.json, its threads and instances, and Triton's state."""
    try:
        index, down = repository_index(clients), False
    except ServingError:
        index, down = {}, True
    rows = []
    for entry in list_models(Path(repository)):
        if entry.native:
            continue
        meta = entry.metadata
        if down:
            state, version, reason = "Triton unreachable", "", ""
        else:
            state, version, reason = variant_state(entry.folder, index.get(entry.name, []))
        rows.append([entry.name, entry.model, entry.variant, meta.technique if meta else entry.variant,
                     meta.size_mb if meta else None, _dev_metric(meta),
                     meta.latency_in_process.p50_ms if meta else None, serving_text(meta.serving if meta else None),
                     state, version, reason])
    return rows


def serving_text(serving) -> str:
    """How a variant is served, from its metadata's `serving` (dyngate_build.metadata.ServingRecord), e.g.
    "1 instance × 1 thread, batch ≤32, queue delay 0 µs"; "" for a build that did not record it."""
    if serving is None:
        return ""
    instances, threads = serving.instances, serving.threads
    return (f"{instances} instance{'s' if instances != 1 else ''} × {threads} thread{'s' if threads != 1 else ''}, "
            f"batch ≤{serving.max_batch_size}, queue delay {serving.queue_delay_us} µs")


def native_rows(repository: Path) -> list[list]:
    """One row per native flavour (NATIVE_HEADERS): the variant for NVIDIA's tritonserver container (platform
    onnxruntime_onnx / pytorch_libtorch), which the embedded server (python backend only) cannot load."""
    return [[entry.name, entry.model, entry.variant, entry.backend,
             entry.metadata.size_mb if entry.metadata else None, _dev_metric(entry.metadata), NATIVE_NOTE]
            for entry in list_models(Path(repository)) if entry.native]


def control(clients: ClientPool, repository: Path, name: str | None, action: str) -> str:
    """Load or unload `name` on Triton; returns a one-line Markdown result."""
    known = [e.name for e in list_models(Path(repository))]
    if not name:
        raise InputError("pick a Triton model to load or unload")
    if name not in known:
        raise InputError(f"{name!r} is not in the repository; its models are: {', '.join(known)}")
    if action not in ("load", "unload"):
        raise InputError(f"action={action!r}: choose load or unload")
    with TritonClient(clients.url, clients.protocol, timeout_s=CONTROL_TIMEOUT_S) as client:
        getattr(client, action)(name, timeout_s=CONTROL_TIMEOUT_S)  # over gRPC: inference is not stalled
    # Triton answers an unload before the model's instances have stopped: wait until the index agrees
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        try:
            state = served_state(repository_index(clients).get(name, []))
        except ServingError:
            break
        if state not in ("LOADING", "UNLOADING") and (state == "READY") == (action == "load"):
            break
        time.sleep(0.2)
    return f"{action}ed `{name}`" if action == "unload" else f"loaded `{name}`"
