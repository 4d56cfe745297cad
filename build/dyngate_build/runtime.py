"""What a served variant runs: raw request bytes -> preprocessing -> graph -> labelled answer.

This one module is used twice, so a variant is measured exactly as it is served:
- the build imports it to check and evaluate every exported variant in process;
- the repository writer copies it next to `model.py` in each Triton version folder, where the python
  backend imports it (the folder must stand alone, so it imports nothing from dyngate).

Only numpy is imported at module level. `tokenizers`, `PIL`, `onnxruntime` and `torch` are imported when a
variant needs them: every Triton model instance is a process, and torch alone costs ~240 MB and 2 s.

A variant folder holds `runtime.json` (read by `RuntimeSpec.load`) next to its graph and preprocessing files.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

RUNTIME_FILE = "runtime.json"
TOKENIZER_FILE = "tokenizer.json"
RUNTIME_SCHEMA_VERSION = 1  # of runtime.json; a folder written with another one is refused (rebuild it)
# The image file formats a served variant decodes (PIL format names: `Image.open(..., formats=...)`): never EPS
# (Ghostscript), PSD, ICO, ... for bytes from the network. The one list; the gateway's messages name it too.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")


class InputError(ValueError):
    """One request input cannot be served; the message names the problem. Other requests are unaffected.

    (Standalone on purpose: this file runs inside Triton without dyngate installed. `dyngate_build.errors.InputError`
    is the build-side twin; the build converts between them where they meet.)
    """


class RuntimeSpecVersionError(ValueError):
    """runtime.json was written by another dyngate version (schema_version differs); the message says how to
    rebuild. (Standalone like InputError; `dyngate_build.metadata.StaleRepositoryError` is the build's twin.)"""


@dataclass
class ImageSpec:
    """Image preprocessing of a ViT-style classifier, as `ViTImageProcessor` does it.

    size: (height, width) in pixels fed to the graph; mean/std: per channel, after rescaling by
    `rescale_factor`; resample: PIL filter name. Accepted input: PIL modes in `modes`, each side within
    [min_side, max_side] pixels, at most `max_bytes` bytes encoded, in one of the PIL `formats`.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: str = "bilinear"
    modes: tuple[str, ...] = ("L", "RGB", "RGBA", "P", "LA")
    min_side: int = 8
    max_side: int = 4096
    max_bytes: int = 20 * 1024 * 1024  # encoded file size; larger inputs are refused before decoding
    formats: tuple[str, ...] = IMAGE_FORMATS  # decoders PIL may use


@dataclass
class RuntimeSpec:
    """Everything `model.py` needs to serve one variant; stored as `runtime.json`.

    Attributes:
        task: "text-classification", "image-classification" or "token-classification".
        client_input: "TEXT" (UTF-8 bytes) or "IMAGE" (encoded PNG/JPEG/... bytes).
        engine: "onnxruntime" or "torchscript".
        artifact: graph file name inside the folder (model.onnx, model.pt).
        graph_inputs: graph input names in order (input_ids, attention_mask | pixel_values).
        labels: class names, index = logit position.
        max_length: tokens per text after truncation (special tokens included).
        max_text_chars: longer texts are refused with InputError.
        image: ImageSpec for image tasks.
        input_dtype: dtype of floating graph inputs ("float32"; "float16" for half-precision TorchScript).
        threads: intra-op threads of the engine (ONNX Runtime intra_op_num_threads, torch.set_num_threads), with
            one inter-op thread and no spin-waiting; 0 = the library's defaults (all cores, spinning). Served
            variants get `dyngate_build.repository.ServingOptions.threads`.
        device: "cpu" or "cuda" (used when the library and a GPU are there, else CPU).
        extra: engine-specific settings (pad_token_id, exit_threshold, ...).
        schema_version: RUNTIME_SCHEMA_VERSION of the dyngate that wrote the file.
    """

    task: str
    client_input: str
    engine: str
    artifact: str
    graph_inputs: list[str]
    labels: list[str]
    max_length: int = 128
    max_text_chars: int = 20_000
    image: ImageSpec | None = None
    input_dtype: str = "float32"
    threads: int = 0
    device: str = "cpu"
    extra: dict = field(default_factory=dict)
    schema_version: int = RUNTIME_SCHEMA_VERSION

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, RUNTIME_FILE), "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, folder: str) -> "RuntimeSpec":
        """Read folder/runtime.json; RuntimeSpecVersionError when another dyngate version wrote it."""
        with open(os.path.join(folder, RUNTIME_FILE)) as f:
            data = json.load(f)
        if data.get("schema_version") != RUNTIME_SCHEMA_VERSION:
            raise RuntimeSpecVersionError(
                f"{os.path.join(folder, RUNTIME_FILE)} has schema_version {data.get('schema_version', 'none')}, "
                f"this runtime reads {RUNTIME_SCHEMA_VERSION}: it was written by an older dyngate; rebuild the model "
                f"with `dyngate build --model M --techniques T1,T2,...`")
        if data.get("image"):
            image = data["image"]
            data["image"] = ImageSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in image.items()})
        return cls(**data)


# ---------------------------------------------------------------------------------------------- preprocessing

class TextPreprocessor:
    """UTF-8 bytes -> `input_ids`, `attention_mask` (int64, [batch, longest sequence in the batch]).

    Uses the checkpoint's own fast tokenizer (`tokenizer.json`, `tokenizers` library), truncating to
    `max_length` tokens and padding to the longest text of the batch, never to a fixed length.
    """

    def __init__(self, folder: str, spec: RuntimeSpec):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(os.path.join(folder, TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(spec.max_length)
        self.pad_id = int(spec.extra.get("pad_token_id", 0))
        self.max_text_chars = spec.max_text_chars

    def decode(self, raw: bytes) -> str:
        """Return the text in `raw`; InputError when it is not UTF-8, empty or too long.

        Inputs over 4 bytes per allowed character are refused before decoding (UTF-8 needs at most 4 bytes
        per character), so a huge request costs no decode.
        """
        if len(raw) > 4 * self.max_text_chars:
            raise InputError(f"TEXT has {len(raw)} bytes; the limit is {self.max_text_chars} characters "
                             f"({4 * self.max_text_chars} bytes of UTF-8)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"TEXT is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise InputError("TEXT is empty; send at least one non-space character")
        if len(text) > self.max_text_chars:
            raise InputError(f"TEXT has {len(text)} characters; the limit is {self.max_text_chars}")
        return text

    def tokenize(self, texts: list[str]) -> list:
        """One `tokenizers.Encoding` per text (special tokens added, truncated to `max_length`)."""
        return self.tokenizer.encode_batch(texts)

    @staticmethod
    def check_content(encoding) -> None:
        """InputError when `encoding` holds special tokens only: the text was made of characters the tokenizer's
        normalizer drops (NUL and other control characters, BOM, zero-width joiner, ...), so the model would
        classify an empty input. Refused like a whitespace-only text."""
        if all(encoding.special_tokens_mask):
            raise InputError("TEXT is empty once tokenized: it holds only characters the tokenizer drops "
                             "(control, zero-width or byte-order marks); send at least one visible character")

    def feeds(self, encodings: list) -> dict[str, np.ndarray]:
        """`input_ids`, `attention_mask` (int64 [B, L]) of `encodings`, padded to the longest of them."""
        longest = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), longest), dtype=np.int64)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def to_rgb(image):
    """A PIL image as RGB, transparency composited onto white, as Hugging Face image processors do with
    `do_convert_rgb` (`transformers.image_transforms.convert_to_rgb`): an image with an alpha band (RGBA, LA,
    PA) or a palette/grey image with a `transparency` entry goes through RGBA over an opaque white background;
    anything else is `convert("RGB")`. PIL's plain `convert("RGB")` drops alpha, turning transparent pixels
    black."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImagePreprocessor:
    """Encoded image bytes -> `pixel_values` (float32, [batch, 3, height, width]), as ViTImageProcessor
    (transparency composited onto white first, `to_rgb`)."""

    def __init__(self, spec: RuntimeSpec):
        from PIL import Image

        self.Image = Image
        self.spec = spec.image
        self.dtype = np.dtype(spec.input_dtype)

    def decode(self, raw: bytes):
        """Open `raw` as an image; InputError for bytes that are no image (of an accepted format), over
        `max_bytes`, or of a mode or size not accepted. Mode and size are checked from the header, before any
        pixel is decoded, so a small file that declares huge dimensions costs no memory."""
        Image, spec = self.Image, self.spec
        if not raw:
            raise InputError(f"IMAGE is empty; send the bytes of a {', '.join(spec.formats)} file")
        if len(raw) > spec.max_bytes:
            raise InputError(f"IMAGE has {len(raw)} bytes; the limit is {spec.max_bytes} bytes")
        try:
            image = Image.open(io.BytesIO(raw), formats=list(spec.formats))
        except Image.DecompressionBombError as e:
            raise InputError(f"IMAGE is too large: {e}") from None
        except Exception as e:  # PIL raises many types for broken files; its messages name memory addresses
            raise InputError(f"IMAGE is not a readable image file ({type(e).__name__}); send the bytes of a "
                             f"{', '.join(spec.formats)} file") from None
        if image.mode not in spec.modes:
            raise InputError(f"IMAGE has mode {image.mode!r}; accepted modes: {', '.join(spec.modes)}")
        w, h = image.size
        if min(w, h) < spec.min_side or max(w, h) > spec.max_side:
            raise InputError(
                f"IMAGE is {w}x{h} pixels; each side must be within [{spec.min_side}, {spec.max_side}]")
        try:
            image.load()
            image = to_rgb(image)  # here, not in pixels(): a broken palette fails this item only
        except Exception as e:
            raise InputError(f"IMAGE is not a readable {image.format} file ({type(e).__name__}: truncated or "
                             "corrupt); send the bytes of a complete image file") from None
        return image

    def pixels(self, images) -> np.ndarray:
        """Resize, rescale and normalise PIL images to a [B, 3, H, W] array."""
        Image, spec = self.Image, self.spec
        resample = getattr(Image.Resampling, spec.resample.upper())
        height, width = spec.size
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
        batch = []
        for image in images:
            rgb = to_rgb(image).resize((width, height), resample=resample)
            array = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) * spec.rescale_factor
            batch.append((array - mean) / std)
        return np.stack(batch).astype(self.dtype)


# ---------------------------------------------------------------------------------------------- engines

def onnx_session(path: str, spec: RuntimeSpec):
    """An ONNX Runtime session for `path` with the spec's threads; CUDA first when asked for and available."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if spec.threads:
        options.intra_op_num_threads = spec.threads
        options.inter_op_num_threads = 1
        # Idle pool threads spin-wait for the next run by default: with several stubs and Triton's own threads
        # on a few cores, the spinning takes the CPU the next request needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if spec.device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(path, options, providers=providers)


class OnnxEngine:
    """An ONNX Runtime session over `artifact`; `run(feeds)` returns {"logits": array, ...} by output name."""

    def __init__(self, folder: str, spec: RuntimeSpec):
        self.session = onnx_session(os.path.join(folder, spec.artifact), spec)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], options: dict) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, {name: feeds[name] for name in self.input_names})
        return {name: np.asarray(value, dtype=np.float32) if value.dtype.kind == "f" else value
                for name, value in zip(self.output_names, outputs)}


class TorchScriptEngine:
    """A `torch.jit.load`ed module; called with graph inputs in order; returns {"logits": float32 array}.

    `spec.threads` sets torch's intra-op threads for the whole process (`torch.set_num_threads`) and, when
    torch has not run anything parallel yet (a fresh Triton stub), one inter-op thread.
    """

    def __init__(self, folder: str, spec: RuntimeSpec):
        import torch

        self.torch = torch
        if spec.threads:
            torch.set_num_threads(spec.threads)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # parallel work already ran in this process (the build): keep its pool
                pass
        use_cuda = spec.device == "cuda" and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.module = torch.jit.load(os.path.join(folder, spec.artifact), map_location=self.device).eval()
        self.input_names = list(spec.graph_inputs)
        self.float_dtype = getattr(torch, spec.input_dtype)
        # Early-exit modules take the exit threshold as a last float32 [1] input (spec.extra says so).
        self.threshold_input = bool(spec.extra.get("threshold_input", False))
        self.default_threshold = float(spec.extra.get("exit_threshold", 1.0))

    def run(self, feeds: dict[str, np.ndarray], options: dict) -> dict[str, np.ndarray]:
        torch = self.torch
        args = []
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
            args.append(tensor.to(self.float_dtype) if tensor.is_floating_point() else tensor)
        if self.threshold_input:
            threshold = exit_threshold(options, self.default_threshold)
            args.append(torch.tensor([threshold], dtype=torch.float32, device=self.device))
        # The profiling executor re-specialises the graph for every new input shape (each sentence length);
        # measured here it costs more than it gains for these graphs, so it is off.
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            out = self.module(*args)
        if isinstance(out, dict):
            items = out.items()
        elif isinstance(out, (tuple, list)):
            items = zip(["logits", "exit_layer"], out)
        else:
            items = [("logits", out)]
        return {k: (v.float() if v.is_floating_point() else v).cpu().numpy() for k, v in items}


# The request parameters a served variant reads (Triton request parameters; `Predictor.predict`'s options): the
# one list `dyngate predict --param` checks names against. Which variant reads which: `request_parameters`.
REQUEST_PARAMETERS = ("exit_threshold",)


def request_parameters(spec: RuntimeSpec) -> tuple[str, ...]:
    """The REQUEST_PARAMETERS a variant run from `spec` reads: ("exit_threshold",) for early exit (the segment
    engine `early-exit-onnx`, or a TorchScript module with a threshold input, `extra["threshold_input"]`), () for
    every other variant (it accepts a valid `exit_threshold` and ignores it)."""
    if spec.engine == "early-exit-onnx" or spec.extra.get("threshold_input"):
        return ("exit_threshold",)
    return ()


def check_exit_threshold(value) -> float:
    """The one rule for an `exit_threshold` value, applied by the served runtime and the gateway alike.

    Accepted: a finite real number ≥ 0, or its decimal string ("0.9"); 1.0 or above means never exit (the full
    model answers). Refused with InputError: a boolean (JSON `true` is no threshold, although Python's
    float(True) is 1.0), anything that is not a number, negative or non-finite values. Returns it as float.
    """
    if isinstance(value, bool):
        raise InputError(f"exit_threshold={value!r} is a boolean, not a threshold; send a number ≥ 0 "
                         "(e.g. 0.9; 1.0 or above = never exit)")
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise InputError(f"exit_threshold={value!r} is not a number; send a number ≥ 0 "
                         "(e.g. 0.9; 1.0 or above = never exit)") from None
    if not math.isfinite(threshold) or threshold < 0:
        raise InputError(f"exit_threshold={value!r} must be a finite number ≥ 0 (e.g. 0.9; 1.0 or above = "
                         "never exit)")
    return threshold


def exit_threshold(options: dict, default: float) -> float:
    """The request's `exit_threshold` (checked by `check_exit_threshold`), else `default` when absent or null."""
    value = (options or {}).get("exit_threshold")
    return default if value is None else check_exit_threshold(value)


def exit_confidence(logits: np.ndarray, criterion: str) -> np.ndarray:
    """Confidence in [0, 1] per row of logits [..., C]: max probability, or 1 - entropy / log(C)."""
    probs = softmax(logits)
    if criterion == "entropy":
        entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=-1)
        return 1.0 - entropy / math.log(logits.shape[-1])
    return probs.max(axis=-1)


class EarlyExitOnnxEngine:
    """Early exit over one ONNX graph per segment (`early_exit.json` in the artifact folder lists them).

    Runs embeddings, then layer 1, 2, ...; after a layer with an off-ramp, rows whose confidence reaches
    the request's `exit_threshold` take that ramp's logits and leave the batch, the rest continue, and the
    last layer's survivors go through the model's own head. Layers after every row has exited are never
    run. Token tasks (`level` "token") exit a row when every real token is confident. Returns
    {"logits", "exit_layer"} (int64, layers computed per row). `calls` counts segment runs and `rows` the
    rows each segment computed.

    Segments are chained by tensor name, with nothing family-specific here: the graph inputs, the
    embeddings' outputs (its first output is `hidden`, the others are named in the manifest's `state`) and
    the last layer's output form one set of named tensors; each segment is fed the ones its graph inputs
    name. When rows exit, every tensor is cut to the remaining rows except the manifest's `shared` ones
    (no batch axis, e.g. DeBERTa's relative positions).
    """

    def __init__(self, folder: str, spec: RuntimeSpec):
        root = os.path.join(folder, spec.artifact)
        with open(os.path.join(root, "early_exit.json")) as f:
            self.manifest = json.load(f)
        self.sessions = {name: onnx_session(os.path.join(root, file), spec)
                         for name, file in self.manifest["segments"].items()}
        self.layers = int(self.manifest["layers"])
        self.exit_layers = set(int(x) for x in self.manifest["exit_layers"])
        self.criterion = self.manifest.get("criterion", "max_prob")
        self.default = float(spec.extra.get("exit_threshold", self.manifest.get("default_threshold", 1.0)))
        self.token_level = self.manifest.get("level") == "token"
        self.inputs = list(self.manifest["inputs"])
        self.state = list(self.manifest.get("state", []))
        self.shared = set(self.manifest.get("shared", []))
        self.calls: dict[str, int] = {}
        self.rows: dict[str, int] = {}

    def _run_all(self, name: str, tensors: dict, rows: int) -> list:
        """Run segment `name` on the tensors its graph inputs name; all of its outputs, in order."""
        self.calls[name] = self.calls.get(name, 0) + 1
        self.rows[name] = self.rows.get(name, 0) + rows
        session = self.sessions[name]
        return session.run(None, {i.name: tensors[i.name] for i in session.get_inputs()})

    def _run(self, name: str, tensors: dict, rows: int) -> np.ndarray:
        return self._run_all(name, tensors, rows)[0]

    def run(self, feeds: dict[str, np.ndarray], options: dict) -> dict[str, np.ndarray]:
        threshold = exit_threshold(options, self.default)
        tensors = {name: feeds[name] for name in self.inputs}
        batch = int(tensors[self.inputs[0]].shape[0])
        hidden, *state = self._run_all("embeddings", tensors, batch)
        tensors.update(zip(self.state, state), hidden=hidden)
        out = None
        exit_layer = np.full(batch, self.layers, dtype=np.int64)
        active = np.arange(batch)
        for number in range(1, self.layers + 1):
            tensors["hidden"] = self._run(f"layer_{number}", tensors, active.size)
            if number not in self.exit_layers or threshold >= 1.0 or number == self.layers:
                continue
            logits = self._run(f"ramp_{number}", tensors, active.size).astype(np.float32)
            conf = exit_confidence(logits, self.criterion)
            if self.token_level:  # the sentence's least confident real token decides
                conf = np.where(tensors["attention_mask"].astype(bool), conf, np.inf).min(axis=1)
            done = conf >= threshold
            if done.any():
                if out is None:
                    out = np.zeros((batch,) + logits.shape[1:], dtype=np.float32)
                out[active[done]] = logits[done]
                exit_layer[active[done]] = number
                keep = ~done
                active = active[keep]
                tensors = {k: (v if k in self.shared else v[keep]) for k, v in tensors.items()}
                if active.size == 0:
                    return {"logits": out, "exit_layer": exit_layer}
        final = self._run("head", tensors, active.size).astype(np.float32)
        if out is None:
            out = np.zeros((batch,) + final.shape[1:], dtype=np.float32)
        out[active] = final
        return {"logits": out, "exit_layer": exit_layer}


ENGINES = {"onnxruntime": OnnxEngine, "torchscript": TorchScriptEngine, "early-exit-onnx": EarlyExitOnnxEngine}


# ---------------------------------------------------------------------------------------------- postprocessing

def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float64 internally for stable probabilities."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classification_answer(logits: np.ndarray, labels: list[str]) -> dict:
    """logits [C] -> {"label", "score", "probabilities": {label: p}}."""
    probs = softmax(logits)
    top = int(np.argmax(probs))
    return {"label": labels[top], "score": float(probs[top]),
            "probabilities": {labels[i]: float(p) for i, p in enumerate(probs)}}


CONFIDENCE_DIGITS = 6


def answer_confidence(answer: dict) -> float:
    """How sure one answer is, in [0, 1], rounded to CONFIDENCE_DIGITS: the top-1 probability of a
    classification answer; for NER the lowest entity score (1.0 without entities). The gateway's `cascade`
    policy keeps an answer whose confidence reaches its threshold, and the build stores this value per dev
    example (metadata.DevScores) to choose that threshold: one rule for both."""
    if "entities" in answer:
        scores = [float(e["score"]) for e in answer.get("entities") or [] if e.get("score") is not None]
        value = min(scores) if scores else 1.0
    elif answer.get("probabilities"):
        value = float(max(answer["probabilities"].values()))
    else:
        value = float(answer.get("score") or 0.0)
    return round(value, CONFIDENCE_DIGITS)


def entity_answer(logits: np.ndarray, encoding, text: str, labels: list[str]) -> dict:
    """Token logits [L, C] of one sentence -> words with BIO labels and entity spans (character offsets).

    A word takes the label of its first sub-word token. Entities group a B-X word with the I-X words after
    it (an I-X with no B-X before it opens an entity too), each with start/end character offsets into
    `text`, its text and the mean word score.
    """
    probs = softmax(logits)
    words: list[dict] = []
    seen = set()
    for position, word_id in enumerate(encoding.word_ids):
        if word_id is None or word_id in seen:
            continue
        seen.add(word_id)
        start, end = encoding.word_to_chars(word_id)
        top = int(np.argmax(probs[position]))
        words.append({"word": text[start:end], "start": start, "end": end, "label": labels[top],
                      "score": float(probs[position, top])})
    entities: list[dict] = []
    for word in words:
        tag, _, kind = word["label"].partition("-")
        if tag == "I" and entities and entities[-1]["entity"] == kind and entities[-1]["open"]:
            current = entities[-1]
            current["end"], current["scores"] = word["end"], current["scores"] + [word["score"]]
        elif tag in ("B", "I") and kind:
            entities.append({"entity": kind, "start": word["start"], "end": word["end"],
                             "scores": [word["score"]], "open": True})
        elif entities:
            entities[-1]["open"] = False
    spans = [{"entity": e["entity"], "start": e["start"], "end": e["end"], "text": text[e["start"]:e["end"]],
              "score": float(np.mean(e["scores"]))} for e in entities]
    return {"entities": spans, "words": words}


# ---------------------------------------------------------------------------------------------- predictor

@dataclass
class Prediction:
    """One answer: `answer` (JSON-ready dict) and `logits` (float32; [C], or [L, C] for token tasks)."""

    answer: dict
    logits: np.ndarray


class Predictor:
    """Serve one variant folder: `predict(list of raw bytes) -> list of Prediction | InputError`.

    Inputs that fail preprocessing get their InputError in place; the rest run as one batch (padded to the
    longest), so one bad request never fails its neighbours.
    """

    def __init__(self, folder: str, engine=None):
        """Load `folder`'s runtime.json, preprocessing and engine; `engine` replaces the engine (the build's
        PyTorch reference uses this to share preprocessing and answers with the variants)."""
        self.folder = folder
        self.spec = RuntimeSpec.load(folder)
        spec = self.spec
        if engine is None and spec.engine not in ENGINES:
            raise ValueError(f"engine {spec.engine!r} unknown; known: {', '.join(ENGINES)}")
        self.preprocessor = (TextPreprocessor(folder, spec) if spec.client_input == "TEXT"
                             else ImagePreprocessor(spec))
        self.engine = engine if engine is not None else ENGINES[spec.engine](folder, spec)

    def features(self, raws: list[bytes]):
        """Preprocess `raws`; returns (feeds for the valid ones, their encodings (text) or None, per-item decoded
        value or InputError). A text whose tokens are all special tokens is an InputError here."""
        decoded: list = []
        for raw in raws:
            try:
                decoded.append(self.preprocessor.decode(raw))
            except InputError as e:
                decoded.append(e)
        encodings = None
        if isinstance(self.preprocessor, TextPreprocessor):
            positions = [i for i, d in enumerate(decoded) if not isinstance(d, InputError)]
            tokenized = self.preprocessor.tokenize([decoded[i] for i in positions]) if positions else []
            encodings = []
            for i, encoding in zip(positions, tokenized):
                try:
                    self.preprocessor.check_content(encoding)
                    encodings.append(encoding)
                except InputError as e:
                    decoded[i] = e
        valid = [d for d in decoded if not isinstance(d, InputError)]
        if not valid:
            return None, None, decoded
        if encodings is not None:
            feeds = self.preprocessor.feeds(encodings)
        else:
            feeds = {"pixel_values": self.preprocessor.pixels(valid)}
        return feeds, encodings, decoded

    def predict(self, raws: list[bytes], options: dict | None = None) -> list:
        """Answer each raw input; returns a Prediction or an InputError per item, in order.

        options: request parameters. An `exit_threshold` in them is checked by `check_exit_threshold` for every
        variant, early exit or not (InputError for the whole call), so one value is accepted or refused alike
        by all variants and by the gateway."""
        if (options or {}).get("exit_threshold") is not None:
            options = {**options, "exit_threshold": check_exit_threshold(options["exit_threshold"])}
        feeds, encodings, decoded = self.features(raws)
        if feeds is None:
            return decoded
        outputs = self.engine.run(feeds, options or {})
        logits = outputs["logits"]
        exit_layers = outputs.get("exit_layer")
        results, row = [], 0
        for item in decoded:
            if isinstance(item, InputError):
                results.append(item)
                continue
            results.append(self._answer(item, logits, row, encodings, exit_layers))
            row += 1
        return results

    def _answer(self, item, logits: np.ndarray, row: int, encodings, exit_layers) -> Prediction:
        labels = self.spec.labels
        if self.spec.task == "token-classification":
            length = len(encodings[row].ids)
            row_logits = logits[row, :length]
            answer = entity_answer(row_logits, encodings[row], item, labels)
        else:
            row_logits = logits[row]
            answer = classification_answer(row_logits, labels)
        if encodings is not None and encodings[row].overflowing:
            answer["truncated_to_tokens"] = self.spec.max_length  # the text was longer; the rest was not read
        if exit_layers is not None:
            answer["exit_layer"] = int(np.asarray(exit_layers).reshape(-1)[row])
        if not np.all(np.isfinite(row_logits)):
            answer["warning"] = "non-finite logits"
        return Prediction(answer=answer, logits=np.asarray(row_logits, dtype=np.float32))


def json_default(value):
    """json.dumps default for numpy scalars."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(type(value))
