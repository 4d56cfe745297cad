"""The Models tab: every model and variant in the repository with its technique, size, accuracy and Triton's
state, and loading/unloading through Triton's model-control API (the server runs with explicit model control).
"""

from __future__ import annotations

import time
from pathlib import Path

from build.errors import InputError, ServingError
from build.repository import list_models
from gateway.client import TritonClient
from gateway.handlers import STATUS_TIMEOUT_S, ClientPool

HEADERS = ["triton model", "model", "variant", "technique", "flavour", "size MB", "accuracy", "build p50 ms",
           "state"]
CONTROL_TIMEOUT_S = 180.0
SETTLE_S = 30.0  # loading a torch variant on a busy 2-core machine takes a while


def repository_index(clients: ClientPool) -> dict[str, dict]:
    """Triton's repository index by model name ({} entries' state "UNREACHABLE" when Triton is down)."""
    client = TritonClient(clients.url, clients.protocol, timeout_s=STATUS_TIMEOUT_S)
    try:
        index = client._call(client._client.get_model_repository_index, json=True)
    finally:
        client.close()
    models = index.get("models", []) if isinstance(index, dict) else index
    return {m["name"]: m for m in models}


def model_rows(repository: Path, clients: ClientPool) -> list[list]:
    try:
        index, down = repository_index(clients), False
    except ServingError:
        index, down = {}, True
    rows = []
    for entry in list_models(Path(repository)):
        meta = entry.metadata
        accuracy = meta.get("accuracy") or {}
        state = "Triton unreachable" if down else (index.get(entry.name, {}).get("state") or "UNAVAILABLE")
        reason = index.get(entry.name, {}).get("reason")
        if reason and state != "READY" and reason != "unloaded":
            state += f" ({reason})"
        rows.append([entry.name, entry.model, entry.variant, meta.get("technique", entry.variant),
                     "native" if entry.native else entry.backend, meta.get("size_mb"),
                     None if accuracy.get("value") is None else f"{accuracy.get('name', 'accuracy')} "
                                                                f"{accuracy['value']:.4f}",
                     (meta.get("latency_in_process") or {}).get("p50_ms"), state])
    return rows


def control(clients: ClientPool, repository: Path, name: str | None, action: str) -> str:
    """Load or unload `name` on Triton; returns a one-line Markdown result."""
    known = [e.name for e in list_models(Path(repository))]
    if not name:
        raise InputError("pick a Triton model to load or unload")
    if name not in known:
        raise InputError(f"{name!r} is not in the repository; its models are: {', '.join(known)}")
    if action not in ("load", "unload"):
        raise InputError(f"action={action!r}: choose load or unload")
    client = TritonClient(clients.url, clients.protocol, timeout_s=CONTROL_TIMEOUT_S)
    try:
        method = getattr(client._client, f"{action}_model")
        if client.protocol == "grpc":
            method(name, client_timeout=CONTROL_TIMEOUT_S)
        else:
            method(name)
    except Exception as e:
        from gateway.client import _message, _unreachable

        if _unreachable(e):
            raise ServingError(f"Triton at {clients.url} is not reachable: {_message(e)}") from e
        raise ServingError(f"Triton could not {action} {name}: {_message(e)}") from e
    finally:
        client.close()
    # Triton answers an unload before the model's instances have stopped: wait until the index agrees
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        try:
            state = repository_index(clients).get(name, {}).get("state")
        except ServingError:
            break
        if state not in ("LOADING", "UNLOADING") and (state == "READY") == (action == "load"):
            break
        time.sleep(0.2)
    return f"{action}ed `{name}`" if action == "unload" else f"loaded `{name}`"
