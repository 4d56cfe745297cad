"""End to end on real parts: presets -> ONNX/TorchScript -> repository -> embedded Triton -> HTTP and gRPC.

Every answer Triton gives for real dev inputs (SST-2 sentences, digits images, CoNLL sentences) must equal
the in-process PyTorch reference run on the same inputs; bad inputs get clear errors and the next good
request still succeeds.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from dyngate_build.errors import InputError, ServingError
from dyngate_build.repository import list_models, read_config, triton_name
from tests.conftest import BASELINE_VARIANTS, PRESET_NAMES

N_INPUTS = 8


@pytest.fixture(scope="session")
def references(preset_checkpoints, cache_dir, data_source, tmp_path_factory):
    """Per preset: (dev examples, PyTorch reference predictions on them through the serving runtime)."""
    from dyngate_build.data import load_examples
    from dyngate_build.variant_folder import reference_predictor
    from dyngate_build.sources import load_source

    result = {}
    for name in PRESET_NAMES:
        source = load_source(name, cache_dir, data_source)
        examples, _ = load_examples(source.family.task, "dev", data_source, limit=N_INPUTS)
        predictor = reference_predictor(source, tmp_path_factory.mktemp(name))
        result[name] = (examples, predictor.predict([ex.raw for ex in examples]))
    return result


def test_repository_has_both_flavours_and_configs_parse(built_repository):
    entries = {e.name: e for e in list_models(built_repository)}
    for model in PRESET_NAMES:
        for variant in BASELINE_VARIANTS:
            python_name, native_name = triton_name(model, variant), triton_name(model, variant, native=True)
            assert entries[python_name].backend == "python"
            assert entries[native_name].backend in ("onnxruntime_onnx", "pytorch_libtorch")
            for name in (python_name, native_name):
                config = read_config(entries[name].folder)
                assert config.name == name and config.max_batch_size > 0
            meta = entries[python_name].metadata
            assert meta.model == model and meta.variant == variant
            assert meta.size_bytes == (entries[python_name].folder / "1" /
                                          ("model.onnx" if variant == "fp32" else "model.pt")).stat().st_size
            assert meta.agreement.top1 >= 0.99 and 0 <= meta.accuracy.value <= 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", PRESET_NAMES)
def test_triton_answers_equal_pytorch_reference(triton, references, model, protocol):
    from dyngate_serving.client import TritonClient

    client = TritonClient(triton.endpoints[protocol], protocol=protocol)
    examples, expected = references[model]
    for variant in BASELINE_VARIANTS:
        for example, reference in zip(examples, expected):
            got = client.predict(triton_name(model, variant), example.raw)
            np.testing.assert_allclose(got.logits.reshape(reference.logits.shape), reference.logits, atol=1e-3)
            if "label" in reference.answer:
                assert got.answer["label"] == reference.answer["label"]
            else:
                spans = [(e["entity"], e["start"], e["end"]) for e in got.answer["entities"]]
                assert spans == [(e["entity"], e["start"], e["end"]) for e in reference.answer["entities"]]


def test_concurrent_requests_are_batched_and_all_correct(triton, references):
    """Many clients at once: model.py runs merged requests as one batch, and every answer stays right."""
    from dyngate_serving.client import TritonClient

    model = triton_name("distilbert-tiny", "fp32")
    examples, expected = references["distilbert-tiny"]
    failures, errors = [], []

    start_together = threading.Barrier(16)  # each round's 16 requests arrive at once, however busy the machine

    def worker(offset: int):
        client = TritonClient(triton.endpoints["grpc"], protocol="grpc")  # one client per thread
        try:
            for i in range(4):
                k = (offset + i) % len(examples)
                start_together.wait(timeout=60)
                if client.predict(model, examples[k].raw).answer["label"] != expected[k].answer["label"]:
                    failures.append(k)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not failures
    from dyngate_serving.client import TritonClient as C

    stats = C(triton.endpoints["http"], protocol="http")._client.get_inference_statistics(model)
    batches = stats["model_stats"][0]["batch_stats"]
    assert max(int(b["batch_size"]) for b in batches) > 1, batches


def test_one_request_with_several_items(triton, references):
    from dyngate_serving.client import TritonClient

    client = TritonClient(triton.endpoints["grpc"], protocol="grpc")
    examples, expected = references["deberta-tiny"]
    answers = client.predict_batch(triton_name("deberta-tiny", "fp32"), [ex.raw for ex in examples[:4]])
    for got, reference in zip(answers, expected):
        spans = [(e["entity"], e["start"], e["end"], e["text"]) for e in got.answer["entities"]]
        assert spans == [(e["entity"], e["start"], e["end"], e["text"]) for e in reference.answer["entities"]]
        assert [e["score"] for e in got.answer["entities"]] == pytest.approx(
            [e["score"] for e in reference.answer["entities"]], rel=1e-4)


def _image(mode: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="JPEG" if mode == "CMYK" else "PNG")
    return buffer.getvalue()


BAD_INPUTS = [
    ("distilbert-tiny", b"", "empty"),
    ("distilbert-tiny", ("x" * 30_000).encode(), "30000 characters"),
    ("distilbert-tiny", ("x" * 100_000).encode(), "100000 bytes"),  # over 4 bytes a character: not decoded
    ("distilbert-tiny", b"\xff\xfe\xfa", "not valid UTF-8"),
    ("vit-tiny", b"this is not an image", "not a readable image"),
    ("vit-tiny", _image("CMYK", (32, 32)), "mode 'CMYK'"),
    ("vit-tiny", _image("L", (2, 2)), "2x2 pixels"),
    ("deberta-tiny", b"   ", "empty"),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model,raw,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_gets_clear_error_then_good_request_succeeds(triton, references, protocol, model, raw, message):
    from dyngate_serving.client import TritonClient

    client = TritonClient(triton.endpoints[protocol], protocol=protocol)
    name = triton_name(model, "fp32")
    with pytest.raises(InputError, match=message):
        client.predict(name, raw)
    examples, expected = references[model]
    good = client.predict(name, examples[0].raw)
    np.testing.assert_allclose(good.logits.reshape(expected[0].logits.shape), expected[0].logits, atol=1e-3)
    assert triton.is_alive() and client.is_ready()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unknown_model_or_variant_is_named(triton, protocol):
    from dyngate_serving.client import TritonClient

    client = TritonClient(triton.endpoints[protocol], protocol=protocol)
    with pytest.raises(ServingError, match="distilbert-tiny__no-such-variant"):
        client.predict("distilbert-tiny__no-such-variant", b"fine")
    assert client.predict(triton_name("distilbert-tiny", "fp32"), b"a fine film").answer["label"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dyngate_cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_predict_text_image_and_errors(triton, references, tmp_path):
    url = triton.endpoints["grpc"]
    examples, expected = references["distilbert-tiny"]
    done = _cli("predict", "--model", "distilbert-tiny", "--variant", "torchscript", "--text",
                examples[0].raw.decode(), "--url", url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["label"] == expected[0].answer["label"]

    image_examples, image_expected = references["vit-tiny"]
    image = tmp_path / "digit.png"
    image.write_bytes(image_examples[0].raw)
    done = _cli("predict", "--model", "vit-tiny", "--image", str(image), "--url", url, "--protocol", "grpc")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["label"] == image_expected[0].answer["label"]

    done = _cli("predict", "--model", "distilbert-tiny", "--text", "", "--url", url)
    assert done.returncode == 2 and "TEXT is empty" in done.stderr
    done = _cli("predict", "--model", "nope", "--variant", "fp32", "--text", "hi", "--url", url)
    assert done.returncode == 2 and "nope__fp32" in done.stderr
    done = _cli("predict", "--model", "../etc", "--text", "hi", "--url", url)
    assert done.returncode == 2 and "not a valid name" in done.stderr
