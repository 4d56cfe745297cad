"""The gateway's handlers: plain functions that read the repository and ask Triton; no Gradio layout here.

`gateway/dyngate_gateway/app.py` lays the page out and wires these to events. Everything below can be called (and tested)
without a browser:

    catalog = load_catalog(Path("model_repository"))          # model -> ModelView (its python-backend variants)
    clients = ClientPool("127.0.0.1:8001")                      # per event loop one shared async client
    result = await compare_variants(clients, catalog["distilbert-tiny"], text="a fine film", image=None,
                              variants=["fp32", "torchscript"])
    result.rows, result.answers

Failures a person can fix (empty text, an image that is not an image, a variant the model does not have,
Triton unreachable) raise dyngate's typed errors (`InputError`, `ServingError`) with a message that names
the problem; `user_errors` turns those into `gr.Error` for the page.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from dyngate_build.errors import ConfigError, DyngateError, InputError, ServingError, TritonUnreachable
from dyngate_build.repository import RepositoryEntry, list_models
from dyngate_build.runtime import IMAGE_FORMATS
from dyngate_serving.client import AsyncTritonClient, TritonClient, parse_address
from dyngate_serving.endpoints import http_endpoint_problem, protocol_mismatch

TEXT, IMAGE = "TEXT", "IMAGE"
RESULT_HEADERS = ["variant", "triton model", "prediction", "score", "round trip ms"]
IMAGE_FORMATS_TEXT = ", ".join(IMAGE_FORMATS)  # what a served variant decodes (dyngate_build.runtime), in words
STATUS_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 10.0  # a predict fails after this, never hangs (a restarting Triton answers at once)


@dataclass
class Limits:
    """Caps on what one request may ask of the gateway (the "limits" object of the gateway config).

    max_text_chars: characters of one text. max_image_bytes: bytes of one encoded image (also Gradio's upload
    limit). max_body_bytes: bytes of any HTTP request body (JSON route, Gradio's own routes and uploads);
    larger ones get 413 before they are read; must leave room for a max_image_bytes image in base64 JSON.
    max_bench_*: the Compare tab's caps.

    Raises ConfigError when max_body_bytes cannot hold a max_image_bytes image as base64 JSON.
    """

    max_text_chars: int = 10_000
    max_image_bytes: int = 5 * 1024 * 1024
    max_body_bytes: int = 8 * 1024 * 1024
    max_bench_requests: int = 2_000
    max_bench_concurrency: int = 16
    max_bench_batch: int = 32

    def __post_init__(self):
        needed = base64_json_bytes(self.max_image_bytes)
        if self.max_body_bytes < needed:
            raise ConfigError(f"limits.max_body_bytes={self.max_body_bytes} cannot hold an image of "
                              f"max_image_bytes={self.max_image_bytes} sent as base64 JSON ({needed} bytes); "
                              f"raise max_body_bytes to ≥{needed} or lower max_image_bytes")


def base64_json_bytes(image_bytes: int) -> int:
    """Bytes of a POST /api/predict body carrying an image of `image_bytes` bytes (base64 + 1 KiB of fields)."""
    return 4 * ((image_bytes + 2) // 3) + 1024


# ---------------------------------------------------------------------------------------------- the models

@dataclass
class ModelView:
    """One model of the repository as the page shows it: its python-backend variants, in repository order."""

    name: str
    client_input: str  # "TEXT" or "IMAGE"
    task: str
    labels: list[str]
    variants: dict[str, RepositoryEntry] = field(default_factory=dict)  # variant name -> entry

    @property
    def variant_names(self) -> list[str]:
        return list(self.variants)

    @property
    def is_text(self) -> bool:
        return self.client_input == TEXT

    def readers(self, parameter: str) -> list[str]:
        """Its variants that read the request parameter `parameter` (`RepositoryEntry.request_parameters`: from
        each variant's runtime.json), and those whose folder does not say (not written by dyngate build)."""
        return [name for name, entry in self.variants.items()
                if entry.request_parameters is None or parameter in entry.request_parameters]

    def describe(self) -> str:
        """One Markdown line: task, input, and per variant its technique, size and measured accuracy."""
        parts = []
        for name, entry in self.variants.items():
            meta = entry.metadata
            bits = [meta.technique if meta else name]
            if meta is not None:
                bits.append(f"{meta.size_mb:.2f} MB")
                bits.append(f"{meta.accuracy.name} {meta.accuracy.value:.3f}")
            parts.append(f"`{name}` ({', '.join(bits)})")
        kind = "text" if self.is_text else "image"
        return f"**{self.name}** · {self.task or 'unknown task'} · {kind} input · variants: " + "; ".join(parts)


def load_catalog(repository: Path) -> dict[str, ModelView]:
    """Model name -> ModelView for every model with at least one python-backend variant (native flavours and
    other backends are skipped: the embedded Triton cannot serve them). Sorted by model name."""
    catalog: dict[str, ModelView] = {}
    for entry in list_models(Path(repository)):
        if entry.native or entry.backend != "python":
            continue
        meta = entry.metadata
        view = catalog.get(entry.model)
        if view is None:
            view = ModelView(name=entry.model, client_input=(meta.client_input if meta else TEXT).upper(),
                             task=meta.task if meta else "", labels=list(meta.labels) if meta else [])
            catalog[entry.model] = view
        view.variants[entry.variant] = entry
    return dict(sorted(catalog.items()))


def repository_fingerprint(repository: Path) -> tuple:
    """What changes when a build adds, replaces or removes a model: (folder name, metadata.json mtime in ns)
    of every model folder, sorted. One directory listing and a stat per model; () for a missing repository.
    Runs before every API answer: os.scandir and os.stat on strings, 26 µs against pathlib's 68 µs for 4 models here."""
    from dyngate_build.repository import METADATA_FILE

    try:
        with os.scandir(repository) as entries:
            folders = sorted(entry.path for entry in entries)
    except OSError:
        return ()
    stamps = []
    for folder in folders:
        try:
            stamps.append((os.path.basename(folder), os.stat(os.path.join(folder, METADATA_FILE)).st_mtime_ns))
        except OSError:
            continue
    return tuple(stamps)


def refresh_catalog(catalog: dict[str, ModelView], repository: Path) -> None:
    """Re-read `repository` into `catalog` IN PLACE, so every holder of the dict (router, handlers) sees the
    variants a build added or removed while the gateway runs. New entries go in before removed ones go out:
    a concurrent reader never finds the dict empty."""
    fresh = load_catalog(repository)
    catalog.update(fresh)
    for name in [m for m in catalog if m not in fresh]:
        catalog.pop(name, None)


def all_variant_names(catalog: dict[str, ModelView]) -> list[str]:
    """Every variant name of every model, first-seen order (the API accepts any of them; the handler then
    checks that the chosen model has it)."""
    names: list[str] = []
    for view in catalog.values():
        names += [n for n in view.variant_names if n not in names]
    return names


# --------------------------------------------------------------------------------------------- the clients

class ClientPool:
    """The Triton clients of one Triton url: per event loop one `AsyncTritonClient` that every request on the
    loop shares (`aio()`: the JSON route, the page's handlers), and per thread one `TritonClient` for code that
    runs in threads (`get()`: tritonclient clients are not thread-safe). infer_url: Triton's HTTP endpoint
    ("host:port"), where the loop's client sends inference (`AsyncTritonClient`'s infer_url: less time per
    request than gRPC); None: everything over `url`.
    """

    def __init__(self, url: str, protocol: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S,
                 infer_url: str | None = None):
        self.url, self.timeout_s = url, timeout_s
        self.protocol = parse_address(url, protocol)[1]
        self.infer_url = None if infer_url is None else parse_address(infer_url, "http", "--triton-http")[0]
        self._local = threading.local()
        self._aio: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> AsyncTritonClient

    def aio(self) -> AsyncTritonClient:
        """The running event loop's client (made on first use, then kept: one connection for the loop)."""
        loop = asyncio.get_running_loop()
        client = self._aio.get(loop)
        if client is None:
            client = self._aio[loop] = AsyncTritonClient(self.url, protocol=self.protocol, timeout_s=self.timeout_s,
                                                         infer_url=self.infer_url)
        return client

    async def areset(self) -> None:
        """Close and drop the running loop's client (after Triton went away, or before the loop ends)."""
        client = self._aio.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    def get(self) -> TritonClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = TritonClient(self.url, protocol=self.protocol, timeout_s=self.timeout_s)
            self._local.client = client
        return client

    def reset(self) -> None:
        """Drop this thread's client (after Triton went away: the next call opens a fresh connection instead of
        waiting out a stale channel's reconnect back-off)."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            client.close()

    def status_client(self) -> TritonClient:
        """A short-timeout client for health checks (a new one: cheap, and never blocks a predict)."""
        return TritonClient(self.url, protocol=self.protocol, timeout_s=STATUS_TIMEOUT_S)


def triton_status(clients: ClientPool, catalog: dict[str, ModelView]) -> tuple[bool, str]:
    """(reachable, one Markdown line): Triton's state and the repository variants it has not loaded."""
    client = clients.status_client()
    try:
        if not client.is_ready():
            wrong_port = protocol_mismatch(client.url, client.protocol)
            if wrong_port:  # a running Triton, asked on its other protocol's port: waiting will not help
                return False, f"⚠️ **Triton is not reachable** at `{clients.url}`: {wrong_port}."
            return False, (f"⚠️ **Triton is not reachable** at `{clients.url}` (down or restarting): requests "
                           "fail at once until it is back; start it with `dyngate serve` (or `make serve`). "
                           "The gateway reconnects by itself: no restart or reload needed.")
        try:
            ready = set(client.ready_models())
        except ServingError as e:
            return False, f"**Triton at `{clients.url}` answered with an error:** {e}"
    finally:
        client.close()
    if clients.infer_url is not None:  # Triton's GET /v2 there, not only readiness: its metrics port answers any GET
        problem = http_endpoint_problem(clients.infer_url, STATUS_TIMEOUT_S)
        if problem:
            return False, (f"⚠️ **Triton's HTTP endpoint `http://{clients.infer_url}` (inference, --triton-http) is "
                           f"not reachable** while its gRPC endpoint answers: {problem}.")
    wanted = [e.name for v in catalog.values() for e in v.variants.values()]
    missing = [n for n in wanted if n not in ready]
    line = f"Triton at `{clients.url}` is ready · {len(wanted) - len(missing)}/{len(wanted)} variants loaded"
    if not catalog:
        line += " · the repository holds no python-backend variants: run `dyngate build` first"
    if missing:
        line += f" · **not loaded:** {', '.join(missing)}"
    return True, line


# -------------------------------------------------------------------------------------------- prediction

@dataclass
class Comparison:
    """The answers of several variants to one input: table rows (RESULT_HEADERS) and raw answers by variant."""

    rows: list[list]
    answers: dict[str, dict]


def summarize(answer: dict) -> tuple[str, float | None]:
    """(prediction text, score) for one answer: the label for classification, the entities for NER."""
    if "entities" in answer:
        entities = answer.get("entities") or []
        if not entities:
            return "no entities", None
        text = "; ".join(f"{e.get('entity')}: {e.get('text')!s}" for e in entities)
        scores = [float(e["score"]) for e in entities if e.get("score") is not None]
        return text, (round(sum(scores) / len(scores), 4) if scores else None)
    label = str(answer.get("label", "?"))
    if answer.get("exit_layer") is not None:
        label += f" (exit layer {answer['exit_layer']})"
    score = answer.get("score")
    return label, (round(float(score), 4) if score is not None else None)


def read_input(view: ModelView, text: str | None, image: str | bytes | None, limits: Limits | None = None) -> bytes:
    """The raw bytes to send for `view`: UTF-8 text for text models, the uploaded file's bytes for image models.

    image: a file path (what Gradio hands over) or the bytes themselves. Longer text or bigger images than
    `limits` allows raise InputError naming the limit.
    """
    limits = limits or Limits()
    if view.is_text:
        if text is None or not str(text).strip():
            raise InputError(f"the text is empty: {view.name} is a text model, type a sentence to classify")
        if len(str(text)) > limits.max_text_chars:
            raise InputError(f"the text has {len(str(text))} characters; the gateway's limit is "
                             f"{limits.max_text_chars} (max_text_chars): send a shorter text")
        try:
            return str(text).encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (e.g. "\ud800" in JSON) is no Unicode character
            bad = str(text)[e.start]
            raise InputError(f"the text holds U+{ord(bad):04X} at character {e.start}, a lone surrogate that is "
                             "not a Unicode character; send valid Unicode text") from None
    if image is None or image == "" or image == b"":
        raise InputError(f"no image: {view.name} is an image model, upload a {IMAGE_FORMATS_TEXT} file")
    if isinstance(image, (bytes, bytearray)):
        if len(image) > limits.max_image_bytes:
            raise InputError(f"the image has {len(image)} bytes; the gateway's limit is {limits.max_image_bytes} "
                             "(max_image_bytes): send a smaller file")
        return bytes(image)
    path = Path(image)
    try:
        size = path.stat().st_size
        if size > limits.max_image_bytes:
            raise InputError(f"the image {path.name} has {size} bytes; the gateway's limit is "
                             f"{limits.max_image_bytes} (max_image_bytes): upload a smaller file")
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the uploaded image {path.name}: {e}") from e
    if not raw:
        raise InputError(f"the uploaded file {path.name} is empty; upload a {IMAGE_FORMATS_TEXT} file")
    return raw


def image_from_base64(value: str) -> bytes:
    """The image file's bytes from the JSON route's `image_base64` field: standard base64 (RFC 4648; line breaks
    and spaces, as the `base64` command wraps its output, are dropped), or a data URI
    `data:<image media type>;base64,<base64>` as a browser's FileReader.readAsDataURL gives it (RFC 2397; the
    prefix is stripped, its media type must be `image/...`). The format itself is decided by the
    bytes where the variant decodes them (IMAGE_FORMATS).

    Raises InputError naming the field, the bad part and the accepted forms.
    """
    if value[:5].lower() == "data:":
        header, comma, value = value[5:].partition(",")
        media_type, *parameters = [part.strip().lower() for part in header.split(";")]
        if not comma or "base64" not in parameters:
            raise InputError(f"image_base64 is a data URI without ';base64,' (data:{header[:40]}...): send "
                             "data:image/png;base64,<base64> or the plain base64 of the file")
        if not media_type.startswith("image/"):
            raise InputError(f"image_base64 is a data URI of media type {media_type or 'none'!r}, not an image: "
                             f"send the base64 of a {IMAGE_FORMATS_TEXT} file (data:image/...;base64,...)")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image_base64 is not valid base64: send the file's bytes in standard base64 (RFC 4648), "
                         "optionally as a data URI data:image/png;base64,...") from None
    if not data:
        raise InputError(f"image_base64 is empty: send the base64 of a {IMAGE_FORMATS_TEXT} file")
    return data


def check_variants(view: ModelView, variants: list[str] | None) -> list[str]:
    """The chosen variants in the model's order; InputError when none is chosen or one is unknown."""
    chosen = list(variants or [])
    if not chosen:
        raise InputError(f"no variant ticked: tick at least one of {view.name}'s variants "
                         f"({', '.join(view.variant_names)})")
    unknown = [v for v in chosen if v not in view.variants]
    if unknown:
        raise InputError(f"unknown variant {', '.join(map(repr, unknown))} for model {view.name}; its variants "
                         f"are: {', '.join(view.variant_names)}")
    return [v for v in view.variant_names if v in chosen]


async def compare_variants(clients: ClientPool, view: ModelView, text: str | None, image,
                           variants: list[str] | None, params: dict | None = None,
                           limits: Limits | None = None) -> Comparison:
    """Send one input to each chosen variant of `view`, one after the other (so timings do not compete), through
    the event loop's shared client (`ClientPool.aio`).

    InputError (bad input; every variant would refuse it) and an unreachable Triton stop the whole request.
    A variant that fails on its own (e.g. not loaded) gets an error row; if all fail, ServingError.
    """
    raw = read_input(view, text, image, limits)
    chosen = check_variants(view, variants)
    client = clients.aio()
    rows, answers, failures = [], {}, []
    for variant in chosen:
        name = view.variants[variant].name
        try:
            result = await client.predict(name, raw, params)
        except InputError:
            raise
        except ServingError as e:
            if isinstance(e, TritonUnreachable):
                await clients.areset()
                raise
            failures.append(str(e))
            rows.append([variant, name, f"error: {e}", None, None])
            answers[variant] = {"error": str(e)}
            continue
        prediction, score = summarize(result.answer)
        rows.append([variant, name, prediction, score, round(result.latency_ms, 2)])
        answers[variant] = result.answer
    if len(failures) == len(chosen):
        raise ServingError(failures[0] if len(failures) == 1 else "every variant failed: " + " | ".join(failures))
    return Comparison(rows=rows, answers=answers)


# ---------------------------------------------------------------------------------------- for the page

def user_errors(fn):
    """Decorator for event handlers (plain or async): dyngate's errors become `gr.Error` (shown to the person,
    server goes on)."""
    import inspect

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args, **kwargs):
            import gradio as gr

            try:
                return await fn(*args, **kwargs)
            except DyngateError as e:
                raise gr.Error(str(e), print_exception=False) from e

        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except DyngateError as e:
            raise gr.Error(str(e), print_exception=False) from e

    return wrapper


def image_preview(path: str | None) -> str | None:
    """The uploaded file's path when it opens as an image (for the page's preview), else None."""
    if not path:
        return None
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
    except Exception:
        return None
    return path
