"""Bad input, fuzzed (hypothesis): every preprocessing model, the native graphs, real Triton and the gateway.

Each fuzzed input gets a clear error or a valid answer, never a crash, a hung request or an unhealthy server:
- in process (many examples): `Predictor.predict` of each preset's variant folder, exactly as `model.py` runs it,
  on arbitrary/invalid/huge text bytes and on arbitrary, truncated, corrupted and oversized image files;
  the native graphs (`__native`: ONNX Runtime and TorchScript, as Triton's native backends run them) on token
  ids out of the vocabulary, wrong dtypes and NaN/inf pixels;
- through the embedded Triton (fewer examples): BYTES contents, wrong datatypes and shapes, wrong input names,
  request parameters, raw HTTP/JSON bodies;
- through the gateway: JSON bodies and raw bodies on `POST /api/predict`, and Gradio's "route" endpoint.
The last test checks that Triton is ready, every model READY, a normal request answers, the gateway is up, and
the Triton log of this run shows no crashed stub; it prints the number of fuzz cases run.

Example counts: DYNGATE_FUZZ_EXAMPLES (in process, default 100) and DYNGATE_FUZZ_SERVER_EXAMPLES (through a
server, default 25); with CI set, hypothesis is derandomized so CI runs are reproducible. No timing assertions:
"never hangs" means every request returns within its client timeout.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import os
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from dyngate_build import runtime
from tests.conftest import running_gateway

TEXT_MODELS = ("distilbert-tiny", "deberta-tiny")
IMAGE_MODEL = "vit-tiny"
CLIENT_TIMEOUT_S = 60  # a request that takes longer counts as hung and fails the test
CASES: collections.Counter = collections.Counter()  # fuzz cases run, by test
from dyngate_serving.net import DIRECT as _DIRECT

_COMMON = dict(deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.large_base_example])
IN_PROCESS = settings(max_examples=int(os.environ.get("DYNGATE_FUZZ_EXAMPLES", 100)), **_COMMON)
THROUGH_SERVER = settings(max_examples=int(os.environ.get("DYNGATE_FUZZ_SERVER_EXAMPLES", 25)), **_COMMON)


# ------------------------------------------------------------------------------------------------ inputs

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height grey pixels (its data holds one row only)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * (min(width, 64) + 1))) + _png_chunk(b"IEND", b""))


def encode_image(mode: str, width: int, height: int, fmt: str, seed: int) -> bytes:
    """Random pixels of `mode` saved as `fmt` (PIL), or b"" when PIL cannot write that combination."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    try:
        image = rgb.convert(mode)
        out = io.BytesIO()
        image.save(out, format=fmt)
        return out.getvalue()
    except (OSError, ValueError, KeyError):
        return b""


@st.composite
def image_files(draw) -> bytes:
    """Real image files of many modes and formats, then maybe truncated, bit-flipped or with junk appended."""
    mode = draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "ICO", "PPM"]))
    raw = encode_image(mode, draw(st.integers(1, 80)), draw(st.integers(1, 80)), fmt, draw(st.integers(0, 2**16)))
    damage = draw(st.sampled_from(["none", "truncate", "flip", "append"]))
    if raw and damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif raw and damage == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    elif damage == "append":
        raw += draw(st.binary(max_size=64))
    return raw


IMAGE_BYTES = st.one_of(
    st.binary(max_size=512),
    image_files(),
    st.builds(png_declaring, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"%!PS-Adobe-3.0 EPSF-3.0\n"]),
)

TEXT_BYTES = st.one_of(
    st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),  # lone surrogates: invalid UTF-8
    st.binary(max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=2000).map(str.encode),
    st.integers(0, 120_000).map(lambda n: b"x" * n),  # empty .. beyond the 20 000-character limit
    st.integers(1, 30_000).map(lambda n: ("\U0001F600 " * n).encode()),  # 4-byte characters
    st.sampled_from([b" ", b"\x00", b"\t\n\r", "\u200b".encode(), b"\xef\xbb\xbf", b"\xc3", b"\xed\xa0\x80"]),
)


# ------------------------------------------------------------------------------------------------ checks

def check_answer(result, raw: bytes, spec: runtime.RuntimeSpec) -> None:
    """A Prediction that is valid for `spec`, or an InputError that says something."""
    if isinstance(result, runtime.InputError):
        assert str(result).strip(), "an InputError without a message"
        return
    assert isinstance(result, runtime.Prediction), f"neither Prediction nor InputError: {result!r}"
    json.dumps(result.answer, default=runtime.json_default, allow_nan=False)  # strict JSON: no NaN either
    assert np.all(np.isfinite(result.logits))
    if spec.task == "token-classification":
        text = raw.decode("utf-8")
        for entity in result.answer["entities"]:
            assert 0 <= entity["start"] < entity["end"] <= len(text)
            assert entity["text"] == text[entity["start"]:entity["end"]]
    else:
        assert result.answer["label"] in spec.labels
        assert sum(result.answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------ fixtures

def variant_folder(repository: Path, model: str, variant: str = "fp32", native: bool = False) -> Path:
    """The newest version folder of a variant (what Triton serves)."""
    name = f"{model}__{variant}" + ("__native" if native else "")
    versions = sorted((p for p in (Path(repository) / name).glob("[0-9]*") if p.is_dir() and p.name.isdigit()),
                      key=lambda p: int(p.name))
    if not versions:
        pytest.fail(f"{name} is not in the test repository (tests/conftest.py builds it)")
    return versions[-1]


@pytest.fixture(scope="module")
def predictors(built_repository):
    """Predictor per (model, variant) for the presets' fp32 (ONNX) and torchscript variants."""
    cache = {}

    def get(model: str, variant: str = "fp32") -> runtime.Predictor:
        if (model, variant) not in cache:
            cache[model, variant] = runtime.Predictor(str(variant_folder(built_repository, model, variant)))
        return cache[model, variant]

    return get


GOOD_TEXT = "a gripping, beautifully acted film about Paris"


def good_png() -> bytes:
    from dyngate_build.data import encode_png, load_digit_images

    images, _ = load_digit_images("dev", limit=1)
    return encode_png(images[0])


# ------------------------------------------------------------------------------------- in process: text

@pytest.mark.parametrize("model, variant", [("distilbert-tiny", "fp32"), ("distilbert-tiny", "torchscript"),
                                            ("deberta-tiny", "fp32")])
def test_text_preprocessing_in_process(predictors, model, variant):
    predictor = predictors(model, variant)
    spec = predictor.spec
    tokenizer = Tokenizer.from_file(str(Path(predictor.folder) / runtime.TOKENIZER_FILE))

    @IN_PROCESS
    @given(raw=TEXT_BYTES)
    def fuzz(raw):
        CASES[f"in-process text {model}__{variant}"] += 1
        results = predictor.predict([raw, GOOD_TEXT.encode()])  # a good neighbour in the same batch
        assert len(results) == 2
        check_answer(results[0], raw, spec)
        assert isinstance(results[1], runtime.Prediction), "a bad input failed its neighbour"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            assert isinstance(results[0], runtime.InputError) and "UTF-8" in str(results[0])
            return
        if not text.strip():
            assert isinstance(results[0], runtime.InputError) and "empty" in str(results[0])
        elif len(text) > spec.max_text_chars:
            assert isinstance(results[0], runtime.InputError) and "limit" in str(results[0])
        elif not tokenizer.encode(text, add_special_tokens=False).ids:  # only characters the tokenizer drops
            assert isinstance(results[0], runtime.InputError) and "empty" in str(results[0])
        else:
            assert isinstance(results[0], runtime.Prediction), results[0]

    fuzz()


def test_text_limits_name_the_limit(predictors):
    predictor = predictors("distilbert-tiny")
    limit = predictor.spec.max_text_chars
    at_limit, = predictor.predict([("word " * limit)[:limit].encode()])
    assert isinstance(at_limit, runtime.Prediction)
    assert at_limit.answer["truncated_to_tokens"] == predictor.spec.max_length  # long text: truncated, answered
    over, = predictor.predict([b"x" * (limit + 1)])
    assert isinstance(over, runtime.InputError) and f"the limit is {limit}" in str(over)
    huge, = predictor.predict([b"x" * (64 * 1024 * 1024)])  # refused from its byte length, before decoding
    assert isinstance(huge, runtime.InputError) and "bytes" in str(huge)
    bad, = predictor.predict([b"caf\xe9"])
    assert isinstance(bad, runtime.InputError) and "not valid UTF-8" in str(bad) and "byte 3" in str(bad)


# ------------------------------------------------------------------------------------ in process: images

def test_image_preprocessing_in_process(predictors):
    predictor = predictors(IMAGE_MODEL)
    spec = predictor.spec
    good = good_png()

    @IN_PROCESS
    @given(raw=IMAGE_BYTES)
    def fuzz(raw):
        CASES["in-process image vit-tiny__fp32"] += 1
        results = predictor.predict([raw, good])
        assert len(results) == 2
        check_answer(results[0], raw, spec)
        assert isinstance(results[1], runtime.Prediction), "a bad image failed its neighbour"

    fuzz()


def test_images_refused_from_their_header(predictors):
    """Huge declared dimensions are refused before a pixel is decoded; formats PIL must not run are refused."""
    predictor = predictors(IMAGE_MODEL)
    spec = predictor.spec.image
    for width, height in ((100_000, 100_000), (2**31 - 1, 1), (spec.max_side + 1, 16)):
        result, = predictor.predict([png_declaring(width, height)])
        assert isinstance(result, runtime.InputError), (width, height)
        assert "too large" in str(result) or f"{width}x{height}" in str(result)
    tiny, = predictor.predict([encode_image("RGB", 2, 2, "PNG", 0)])
    assert isinstance(tiny, runtime.InputError) and "2x2 pixels" in str(tiny)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # Ghostscript would run this
    result, = predictor.predict([eps])
    assert isinstance(result, runtime.InputError) and "PNG" in str(result)
    truncated, = predictor.predict([good_png()[:60]])
    assert isinstance(truncated, runtime.InputError) and "truncated or corrupt" in str(truncated)
    big, = predictor.predict([b"\x00" * (spec.max_bytes + 1)])
    assert isinstance(big, runtime.InputError) and f"the limit is {spec.max_bytes} bytes" in str(big)


# --------------------------------------------------------------------------------- in process: native graphs

def _native_runner(folder: Path):
    """run(feeds) for a native artifact with the runtime Triton's native backend uses (ORT or libtorch)."""
    if (folder / "model.onnx").exists():
        import onnxruntime as ort

        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda feeds: session.run(None, {n: feeds[n] for n in names})[0]
    import torch

    module = torch.jit.load(str(folder / "model.pt")).eval()

    def run(feeds):
        with torch.inference_mode():
            out = module(*[torch.from_numpy(v) for v in feeds.values()])
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.numpy()

    return run


@pytest.mark.parametrize("variant", ["fp32", "torchscript"])
def test_native_text_graphs_token_ids(built_repository, variant):
    """Ids out of the vocabulary, negative ids and wrong dtypes: the runtime raises, never crashes; ids in the
    vocabulary answer finite logits."""
    from tokenizers import Tokenizer

    run = _native_runner(variant_folder(built_repository, "distilbert-tiny", variant, native=True))
    vocab = Tokenizer.from_file(str(variant_folder(built_repository, "distilbert-tiny") / "tokenizer.json")
                                ).get_vocab_size()

    @IN_PROCESS
    @given(batch=st.integers(1, 3), length=st.integers(2, 24), data=st.data(),
           kind=st.sampled_from(["in-vocab", "too-large", "negative", "int32", "float32"]))
    def fuzz(batch, length, data, kind):
        CASES[f"in-process native distilbert-tiny__{variant}__native"] += 1
        high = {"in-vocab": vocab, "too-large": 2**40}.get(kind, vocab)
        ids = np.asarray(data.draw(st.lists(st.integers(0, high - 1), min_size=batch * length,
                                            max_size=batch * length)), dtype=np.int64).reshape(batch, length)
        if kind == "too-large":
            ids[0, 0] = data.draw(st.integers(1 << 20, 2**40))  # far beyond any embedding table
        elif kind == "negative":
            ids[0, 0] = data.draw(st.integers(-(2**40), -(1 << 20)))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if kind in ("int32", "float32"):
            feeds = {k: v.astype(kind) for k, v in feeds.items()}
        try:
            logits = run(feeds)
        except Exception as e:  # the runtime's own error: Triton answers it as the request's error
            assert kind != "in-vocab", f"in-vocabulary ids failed: {e}"
            assert str(e).strip()
            return
        assert kind in ("in-vocab", "int32"), f"{kind} ids were answered"
        assert logits.shape[0] == batch
        if kind == "in-vocab":
            assert np.all(np.isfinite(logits))

    fuzz()


@pytest.mark.parametrize("variant", ["fp32", "torchscript"])
def test_native_image_graphs_non_finite_pixels(built_repository, variant):
    run = _native_runner(variant_folder(built_repository, IMAGE_MODEL, variant, native=True))
    size = runtime.RuntimeSpec.load(str(variant_folder(built_repository, IMAGE_MODEL))).image.size

    @IN_PROCESS
    @given(batch=st.integers(1, 3), values=st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e38, -1e38]),
                                                    min_size=1, max_size=8))
    def fuzz(batch, values):
        CASES[f"in-process native {IMAGE_MODEL}__{variant}__native"] += 1
        pixels = np.zeros((batch, 3, *size), dtype=np.float32)
        flat = pixels.reshape(-1)
        flat[np.linspace(0, flat.size - 1, len(values)).astype(int)] = values
        logits = run({"pixel_values": pixels})  # NaN in, NaN out: an answer, not a crash
        assert logits.shape[0] == batch

    fuzz()


# ------------------------------------------------------------------------------------------ through Triton

@pytest.fixture(scope="module")
def triton_log_start(triton):
    """Where this module's part of the shared Triton's log begins."""
    return triton.log_path.stat().st_size


def _infer(url: str, model: str, name: str, data: np.ndarray, datatype: str, parameters: dict | None = None):
    """One gRPC request with tritonclient; returns ("ok", result) or ("error", InferenceServerException)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url.removeprefix("grpc://"))
    try:
        tensor = grpcclient.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        return "ok", client.infer(model, [tensor], parameters=parameters, client_timeout=CLIENT_TIMEOUT_S)
    except InferenceServerException as e:
        assert "Deadline Exceeded" not in str(e), f"{model} did not answer within {CLIENT_TIMEOUT_S} s"
        return "error", e
    finally:
        client.close()


def test_triton_bytes_contents(triton, triton_log_start):
    """Arbitrary BYTES contents, several per request, to the text and image models: answers or INVALID_ARG."""
    url = triton.endpoints["grpc"]

    @THROUGH_SERVER
    @given(model=st.sampled_from([f"{m}__fp32" for m in TEXT_MODELS] + [f"{IMAGE_MODEL}__fp32"]),
           items=st.lists(st.one_of(TEXT_BYTES, IMAGE_BYTES), min_size=1, max_size=4))
    def fuzz(model, items):
        CASES["triton BYTES contents"] += 1
        name = "IMAGE" if model.startswith(IMAGE_MODEL) else "TEXT"
        outcome, value = _infer(url, model, name, np.array([[x] for x in items], dtype=np.object_), "BYTES")
        if outcome == "ok":
            answers = value.as_numpy("RESULT").reshape(-1)
            assert len(answers) == len(items)
            for answer in answers:
                json.loads(answer)
        else:
            assert value.status() == "StatusCode.INVALID_ARGUMENT", value
            assert value.message().strip()

    fuzz()


TENSOR_CASES = st.sampled_from([
    ("FP32", np.float32), ("INT64", np.int64), ("INT32", np.int32), ("UINT8", np.uint8), ("BOOL", np.bool_),
    ("FP16", np.float16), ("BYTES", np.object_),
])


def test_triton_wrong_dtypes_shapes_and_names(triton, triton_log_start):
    """FP32/INT64/... tensors, 1-D/3-D/empty/too-large shapes and wrong names to the python-backend models: Triton
    answers with an error naming the problem (or, for a well-formed BYTES [n, 1], an answer)."""
    url = triton.endpoints["grpc"]

    @THROUGH_SERVER
    @given(model=st.sampled_from([f"{m}__fp32" for m in TEXT_MODELS] + [f"{IMAGE_MODEL}__fp32",
                                                                         "distilbert-tiny__torchscript"]),
           dtype=TENSOR_CASES, shape=st.sampled_from([(1,), (1, 1), (2, 1), (1, 1, 1), (1, 2), (0, 1), (33, 1),
                                                       (2, 3, 1)]),
           name=st.sampled_from(["right", "TEXTX", "input_ids", ""]))
    def fuzz(model, dtype, shape, name):
        CASES["triton dtypes/shapes/names"] += 1
        datatype, np_type = dtype
        right = "IMAGE" if model.startswith(IMAGE_MODEL) else "TEXT"
        input_name = right if name == "right" else name or "x"
        size = int(np.prod(shape))
        if np_type is np.object_:
            data = np.array([GOOD_TEXT.encode()] * size, dtype=np.object_).reshape(shape)
        else:
            data = np.ones(shape, dtype=np_type)
        outcome, value = _infer(url, model, input_name, data, datatype)
        well_formed = (datatype == "BYTES" and input_name == right and len(shape) == 2 and shape[1] == 1
                       and 1 <= shape[0] <= 32)
        if well_formed:
            if right == "TEXT":
                assert outcome == "ok", value
            else:  # text bytes are no image: the model's own INVALID_ARG
                assert outcome == "error" and "IMAGE" in value.message()
            return
        assert outcome == "error", f"{datatype} {shape} {input_name!r} to {model} was answered"
        problems = []  # what Triton may name first; it stops at the first problem it finds
        if input_name != right:
            problems.append(f"'{input_name}'")
        if datatype != "BYTES":
            problems.append(f"data-type is '{datatype}'")
        if len(shape) != 2 or shape[-1] != 1:
            problems.append("shape")
        if shape[0] > 32:
            problems.append("batch-size")
        if shape[0] == 0:
            problems.append("elements")  # Triton counts a [0, 1] request as one item with no data
        assert any(p.lower() in value.message().lower() for p in problems), (problems, value.message())

    fuzz()


def test_triton_request_parameters(triton, triton_log_start):
    url = triton.endpoints["grpc"]
    values = st.one_of(st.integers(-(2**31), 2**31 - 1), st.text(max_size=20), st.booleans(),
                       st.floats(allow_nan=False, allow_infinity=False, width=32).map(str))

    @THROUGH_SERVER
    @given(params=st.dictionaries(st.sampled_from(["exit_threshold", "priority_x", "threshold", "a"]), values,
                                  max_size=3))
    def fuzz(params):
        CASES["triton request parameters"] += 1
        data = np.array([[GOOD_TEXT.encode()]], dtype=np.object_)
        outcome, value = _infer(url, "distilbert-tiny__fp32", "TEXT", data, "BYTES", params)
        if outcome == "error":
            assert value.message().strip()

    fuzz()


def _http(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url + path, data=body, method="POST", headers=headers or {})
    try:
        with _DIRECT.open(request, timeout=CLIENT_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_triton_http_json_bodies(triton, triton_log_start):
    """Raw KServe-v2 JSON bodies to Triton's HTTP infer route: malformed JSON, lying shapes, data of the wrong
    type. Triton answers 200 or an error with {"error": ...}.

    Known Triton 2.51 bug, found by this test: a JSON body that declares a huge shape for a fixed-size datatype
    (e.g. FP32 [1, 2147483647]) makes Triton's HTTP server allocate the declared size before checking anything
    (it hangs, then aborts on std::bad_alloc; the same over gRPC is refused at once, see
    test_triton_grpc_huge_declared_shapes). The embedded binary has no --http-max-input-size (added in later
    Triton releases), so such shapes stay out of this fuzz run; the servers bind 127.0.0.1 only.
    """
    url = triton.endpoints["http"]
    data_values = st.one_of(st.lists(st.one_of(st.text(max_size=40), st.integers(), st.floats(), st.none()),
                                     max_size=4), st.text(max_size=10), st.integers())

    @THROUGH_SERVER
    @given(datatype=st.sampled_from(["BYTES", "FP32", "INT64", "STRING", ""]), data=data_values, sizes=st.data(),
           junk=st.sampled_from([b"", b"{", b"\x00", b"]"]))
    def fuzz(datatype, data, sizes, junk):
        CASES["triton HTTP JSON bodies"] += 1
        fixed_size = datatype in ("FP32", "INT64")
        # fixed-size types: the product of the dims is what Triton allocates, so keep it small (64**3 elements);
        # 4096 per dim reached 4096**3 FP32 (256 GB) in a CI run and Triton aborted (the bug described above)
        shape = sizes.draw(st.lists(st.integers(-2, 64 if fixed_size else 2**31), max_size=3))
        body = json.dumps({"inputs": [{"name": "TEXT", "shape": shape, "datatype": datatype, "data": data}]})
        status, raw = _http(url, "/v2/models/distilbert-tiny__fp32/infer", body.encode() + junk,
                            {"content-type": "application/json"})
        # Triton 2.51 answers a body it cannot parse ("{...}{", data of the wrong JSON type) with 500 and the
        # parse error: its choice of status, not a crash; the last test checks the server is still healthy.
        assert status in (200, 400, 404, 500), (status, raw[:200])
        if status != 200:
            assert json.loads(raw)["error"].strip()
        if junk.strip(b"\x00"):
            assert status != 200 and "parse" in json.loads(raw)["error"], (status, raw[:200])

    fuzz()


def test_triton_grpc_huge_declared_shapes(triton, triton_log_start):
    """Over gRPC, a tiny request that declares a huge tensor is refused at once with a clear error."""
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2

    client = grpcclient.InferenceServerClient(triton.endpoints["grpc"].removeprefix("grpc://"))
    try:
        for datatype, shape in (("FP32", [1, 2**31 - 1]), ("INT64", [2**31 - 1, 1]), ("BYTES", [1, 2**31 - 1]),
                                ("BYTES", [2**40, 1])):
            CASES["triton gRPC huge declared shapes"] += 1
            request = service_pb2.ModelInferRequest(model_name="distilbert-tiny__fp32")
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = "TEXT", datatype
            tensor.shape.extend(shape)
            request.raw_input_contents.append(b"\x00" * 8)
            with pytest.raises(Exception) as info:
                client._client_stub.ModelInfer(request, timeout=CLIENT_TIMEOUT_S)
            assert "INVALID_ARGUMENT" in str(info.value), info.value
            assert any(w in str(info.value) for w in ("data-type", "batch-size", "shape", "elements")), info.value
    finally:
        client.close()


# ----------------------------------------------------------------------------------------- through the gateway

@pytest.fixture(scope="module")
def gateway(built_repository, triton):
    with running_gateway(built_repository, triton, server_pid=triton.pid) as running:
        yield running


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)


@st.composite
def predict_bodies(draw):
    """JSON bodies for POST /api/predict: mostly the route's own fields with fuzzed values."""
    fields = {"model": st.sampled_from(list(TEXT_MODELS) + [IMAGE_MODEL, "../etc/passwd", "", "distilbert-tiny__fp32"])
              | JSON_VALUES,
              "text": st.text(max_size=200) | TEXT_BYTES.map(lambda b: b.decode("utf-8", "replace")) | JSON_VALUES,
              "image_base64": IMAGE_BYTES.map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=40)
              | JSON_VALUES,
              "policy": st.sampled_from(["fastest", "most-accurate", "cascade", "ab", "variant", "fp32", "x"])
              | JSON_VALUES,
              "variant": st.sampled_from(["fp32", "torchscript", "../fp32", ""]) | JSON_VALUES,
              "accuracy_budget": st.floats() | JSON_VALUES, "threshold": st.floats() | JSON_VALUES,
              "exit_threshold": st.floats() | JSON_VALUES, "colour": JSON_VALUES}
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=5))
    body = {key: draw(fields[key]) for key in ["model"] + chosen}
    return body if draw(st.integers(0, 9)) else draw(JSON_VALUES)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    status, raw = _http(url, "/api/predict", body, {"content-type": "application/json"})
    return status, json.loads(raw)


def test_gateway_json_bodies(gateway):
    @THROUGH_SERVER
    @given(body=predict_bodies())
    def fuzz(body):
        CASES["gateway /api/predict JSON"] += 1
        status, answer = _post(gateway.url, json.dumps(body).encode())
        assert status in (200, 400, 404), (status, answer, body)
        if status == 200:
            assert answer["model"] == body["model"] and answer["served_by"]
        else:
            assert answer["error"].strip()

    fuzz()


def test_gateway_raw_bodies(gateway):
    @THROUGH_SERVER
    @given(body=st.one_of(st.binary(max_size=300), st.integers(1, 200_000).map(lambda n: b"[" * n),
                          st.integers(1, 200_000).map(lambda n: b'{"a":' * n),
                          st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass"))))
    def fuzz(body):
        CASES["gateway /api/predict raw bodies"] += 1
        status, answer = _post(gateway.url, body)
        assert status in (400, 404), (status, answer)
        assert answer["error"].strip()

    fuzz()


def test_gateway_gradio_route(gateway):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    api = Client(gateway.url, verbose=False)

    @settings(max_examples=max(3, THROUGH_SERVER.max_examples // 3), **_COMMON)
    @given(text=st.text(max_size=300), policy=st.sampled_from(["fastest", "cascade", "x", ""]),
           exit_threshold=st.sampled_from(["", "0.5", "nan", "-1", "abc"]))
    def fuzz(text, policy, exit_threshold):
        CASES["gateway gradio route"] += 1
        try:
            answer = api.predict("distilbert-tiny", text, None, policy, None, 0.01, 0.9, exit_threshold,
                                 api_name="/route")
        except AppError as e:
            assert str(e).strip()
            return
        assert answer["served_by"]

    fuzz()


# ----------------------------------------------------------------------------------------------- afterwards

def test_servers_are_healthy_after_the_fuzz_run(triton, triton_log_start, gateway, built_repository):
    from dyngate_serving.client import TritonClient
    from dyngate_build.repository import python_backend_models

    with _DIRECT.open(f"{triton.endpoints['http']}/v2/health/ready", timeout=30) as response:
        status = response.status
    assert status == 200
    states = {m["name"]: m.get("state") for m in triton.repository_index()}
    for name in python_backend_models(Path(built_repository)):
        assert states.get(name) == "READY", f"{name} is {states.get(name)} after the fuzz run"
    with TritonClient(triton.endpoints["grpc"]) as client:
        for model in TEXT_MODELS:
            assert client.predict(f"{model}__fp32", GOOD_TEXT.encode()).answer
        assert client.predict(f"{IMAGE_MODEL}__fp32", good_png()).answer["label"]
    with open(triton.log_path, "rb") as f:
        f.seek(triton_log_start)
        log = f.read().decode("utf-8", "replace")
    for sign in ("unhealthy", "Segmentation fault", "core dumped", "Stub process", "Traceback"):
        assert sign not in log, f"Triton's log shows {sign!r} during the fuzz run:\n{log[-3000:]}"
    status, answer = _post(gateway.url, json.dumps({"model": "distilbert-tiny", "text": GOOD_TEXT}).encode())
    assert status == 200 and answer["served_by"]
    total = sum(CASES.values())
    print(f"\nfuzz cases run: {total} — " + ", ".join(f"{k}: {v}" for k, v in sorted(CASES.items())))
    assert total > 0
