"""Inputs read as Hugging Face reads them (issue 12, item 6), in process and through the real Triton and gateway:
transparent images composited onto white (`do_convert_rgb`), texts that tokenize to nothing refused like empty
ones, and one `exit_threshold` rule in Triton's runtime and the gateway. No mocks.

Fixtures from tests/conftest.py: `built_repository` (fp32 and torchscript variants of the presets) and `triton`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dyngate_build.data import load_digit_images
from dyngate_build.errors import InputError
from dyngate_build.repository import list_models
from dyngate_build.runtime import InputError as RuntimeInputError, Predictor
from dyngate_gateway.handlers import ClientPool, load_catalog
from dyngate_gateway.routing import Router
from dyngate_serving.client import TritonClient
from tests.conftest import post_predict as _post, running_gateway

IMAGE_MODEL, TEXT_MODEL = "vit-tiny", "distilbert-tiny"
GOOD_TEXT = "a gripping , beautifully acted film"
TOKENIZE_TO_NOTHING = ["\x00", "\ufeff", "\u200d", "\u200d\ufeff\x00", " \u200d "]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _twins(ink: np.ndarray) -> dict[str, tuple[bytes, bytes]]:
    """For one digit (uint8 [8, 8], 255 = ink), scaled to 64x64: {kind: (transparent PNG, opaque twin PNG)}.

    The digit is drawn in black on a transparent background; its opaque twin is what that looks like over
    white. RGBA and LA carry the ink as alpha (composite = 255 - ink); the palette image marks its background
    index transparent (composite: black ink on white)."""
    big = Image.fromarray(ink, mode="L").resize((64, 64), Image.Resampling.NEAREST)
    alpha = np.asarray(big)
    zeros = np.zeros_like(alpha)
    opaque = Image.fromarray(255 - alpha, mode="L")
    rgba = Image.fromarray(np.stack([zeros, zeros, zeros, alpha], axis=-1), mode="RGBA")
    la = Image.fromarray(np.stack([zeros, alpha], axis=-1), mode="LA")
    mask = (alpha >= 128).astype(np.uint8)  # 1 = ink, 0 = background
    palette = Image.fromarray(mask, mode="P")
    palette.putpalette([0, 0, 0, 0, 0, 0] + [0, 0, 0] * 254)  # background and ink both black: only alpha differs
    palette.info["transparency"] = 0
    palette_twin = Image.fromarray(np.where(mask == 1, 0, 255).astype(np.uint8), mode="L")
    return {"RGBA": (_png(rgba), _png(opaque)), "LA": (_png(la), _png(opaque)),
            "P": (_png(palette), _png(palette_twin))}


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digit_images("dev", limit=40)
    chosen = [int(np.flatnonzero(labels == d)[0]) for d in sorted(set(labels.tolist()))[:6]]
    return [images[i] for i in chosen]


def _folder(repository: Path, name: str) -> Path:
    entry = next(e for e in list_models(repository) if e.name == name)
    return entry.folder / str(entry.versions[-1])


def test_transparent_images_are_read_as_their_opaque_twins_in_process(built_repository, digits):
    predictor = Predictor(str(_folder(Path(built_repository), f"{IMAGE_MODEL}__fp32")))
    black = _png(Image.new("RGB", (64, 64)))  # what PIL's convert("RGB") made of every transparent digit
    black_logits = predictor.predict([black])[0].logits
    for ink in digits:
        for kind, (transparent, opaque) in _twins(ink).items():
            theirs, ours = predictor.predict([opaque, transparent])
            np.testing.assert_allclose(ours.logits, theirs.logits, atol=1e-4, err_msg=kind)
            assert ours.answer["label"] == theirs.answer["label"], kind
            assert np.abs(ours.logits - black_logits).max() > 1e-3, kind  # not the all-black picture
    # the pixels themselves are the opaque twin's (what HF's image processors feed the model)
    transparent, opaque = _twins(digits[0])["RGBA"]
    pre = predictor.preprocessor
    np.testing.assert_array_equal(pre.pixels([pre.decode(transparent)]), pre.pixels([pre.decode(opaque)]))


def test_transparent_image_through_triton_is_its_opaque_twin(triton, digits):
    with TritonClient(triton.endpoints["grpc"]) as client:
        for ink in digits[:3]:
            for kind, (transparent, opaque) in _twins(ink).items():
                ours = client.predict(f"{IMAGE_MODEL}__fp32", transparent)
                theirs = client.predict(f"{IMAGE_MODEL}__fp32", opaque)
                assert ours.answer["label"] == theirs.answer["label"], kind
                np.testing.assert_allclose(ours.logits, theirs.logits, atol=1e-4, err_msg=kind)


# ------------------------------------------------------------------------------------------------- texts

def test_text_of_dropped_characters_is_refused_in_process_and_neighbours_are_served(built_repository):
    predictor = Predictor(str(_folder(Path(built_repository), f"{TEXT_MODEL}__fp32")))
    alone = predictor.predict([GOOD_TEXT.encode()])[0]
    for text in TOKENIZE_TO_NOTHING:
        good, bad = predictor.predict([GOOD_TEXT.encode(), text.encode()])
        assert isinstance(bad, RuntimeInputError) and "TEXT is empty" in str(bad), repr(text)
        np.testing.assert_array_equal(good.logits, alone.logits)
    [only_bad] = predictor.predict(["\u200d".encode()])
    assert isinstance(only_bad, RuntimeInputError)


def test_text_of_dropped_characters_is_refused_through_triton_like_whitespace(triton):
    with TritonClient(triton.endpoints["grpc"]) as client:
        with pytest.raises(InputError, match="TEXT is empty"):
            client.predict(f"{TEXT_MODEL}__fp32", b"   ")  # the existing rule, for comparison
        for text in TOKENIZE_TO_NOTHING:
            with pytest.raises(InputError, match="TEXT is empty"):  # INVALID_ARG, as whitespace
                client.predict(f"{TEXT_MODEL}__fp32", text.encode())
        assert client.predict(f"{TEXT_MODEL}__fp32", GOOD_TEXT.encode()).answer["label"]


# ------------------------------------------------------------------------------------------ exit_threshold

# (value, accepted): one rule for Triton and the gateway; >= 1 means "never exit", booleans are no threshold
EXIT_THRESHOLDS = [(0.0, True), (0.5, True), (1.0, True), (1.5, True), (7, True), ("0.9", True),
                   (True, False), (False, False), (-0.1, False), ("abc", False)]




def test_exit_threshold_one_rule_in_triton_and_the_gateway(built_repository, triton):
    catalog = load_catalog(Path(built_repository))
    router = Router(catalog, ClientPool(triton.endpoints["grpc"]))
    with TritonClient(triton.endpoints["grpc"]) as client, running_gateway(built_repository, triton) as gateway:
        for value, accepted in EXIT_THRESHOLDS:
            outcomes = {}
            try:
                client.predict(f"{TEXT_MODEL}__fp32", GOOD_TEXT.encode(), {"exit_threshold": value})
                outcomes["triton"] = None
            except InputError as e:
                outcomes["triton"] = str(e)
            try:
                router.route(TEXT_MODEL, GOOD_TEXT, "variant", variant="fp32", exit_threshold=value)
                outcomes["router"] = None
            except InputError as e:
                outcomes["router"] = str(e)
            status, answer = _post(gateway.url, {"model": TEXT_MODEL, "text": GOOD_TEXT, "policy": "variant",
                                                 "variant": "fp32", "exit_threshold": value})
            outcomes["json"] = None if status == 200 else answer["error"]
            if accepted:  # fp32 reads no exit_threshold: Triton ignores a valid one, the gateway says it does nothing
                # (passed on where a variant reads it: tests/test_cascade_threshold.py)
                assert outcomes["triton"] is None and status == 400, (value, outcomes)
                for where in ("router", "json"):
                    assert f"does nothing for variant 'fp32' of {TEXT_MODEL}" in outcomes[where], (value, outcomes)
            else:
                assert status == 400, (value, answer)
                for where, message in outcomes.items():
                    assert message and "exit_threshold" in message and "does nothing" not in message, \
                        (value, where, outcomes)
                if isinstance(value, bool):
                    assert all("boolean" in m for m in outcomes.values()), outcomes


def test_text_of_dropped_characters_is_a_400_at_the_gateway(built_repository, triton):
    with running_gateway(built_repository, triton) as gateway:
        status, answer = _post(gateway.url, {"model": TEXT_MODEL, "text": "\u200d\ufeff", "policy": "fastest"})
        assert status == 400 and "TEXT is empty" in answer["error"], answer
