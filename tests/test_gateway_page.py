"""The gateway's Predict page, end to end: a real repository, the embedded Triton, the Gradio app in this
process, Debian's Chromium through Playwright, and gradio_client by api_name. No mocks.

Fixtures from tests/conftest.py: `built_repository` (a built model repository) and `triton` (a started
dyngate_serving.launcher.TritonServer serving it). No timing assertions.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from dyngate_gateway import app as gateway_app
from dyngate_serving.client import TritonClient
from dyngate_gateway.handlers import load_catalog
from dyngate_serving.net import free_port

SCREENSHOT_COPY = Path("/tmp/gateway_page.png")
# SST-2 dev sentences
SENTENCES = ["it 's a charming and often affecting journey . ",
             "unflinchingly bleak and desperate ",
             "the acting , costumes , music , cinematography and sound are all astounding given the production "
             "'s austere locales . "]
TIMEOUT_MS = 60_000


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def catalog(built_repository):
    return load_catalog(Path(built_repository))


def _model_for(catalog, task: str, preferred: str):
    if preferred in catalog:
        return catalog[preferred]
    found = [v for v in catalog.values() if v.task == task]
    if not found:
        pytest.skip(f"the repository has no {task} model")
    return found[0]


@pytest.fixture(scope="module")
def text_model(catalog):
    return _model_for(catalog, "text-classification", "distilbert-tiny")


@pytest.fixture(scope="module")
def image_model(catalog):
    return _model_for(catalog, "image-classification", "vit-tiny")


@pytest.fixture(scope="module")
def grpc_url(triton) -> str:
    return triton.endpoints["grpc"]


@pytest.fixture(scope="module")
def gateway_url(built_repository, grpc_url):
    """The gateway app launched in this process on a free port."""
    demo = gateway_app.build_app(Path(built_repository), grpc_url)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def api(gateway_url):
    from gradio_client import Client

    return Client(gateway_url, verbose=False)


def _direct_labels(grpc_url: str, view, raw: bytes, variants: list[str]) -> dict[str, str]:
    """What Triton answers each variant when asked directly (no gateway)."""
    with TritonClient(grpc_url) as client:
        return {v: client.predict(view.variants[v].name, raw).answer["label"] for v in variants}


# ---------------------------------------------------------------------------------------------- the page

def _select_model(page, name: str) -> None:
    page.click("#model input")
    page.get_by_role("option", name=name, exact=True).click()


# Gradio 6's Dataframe renders its body as a virtual grid: one [role=gridcell] per cell, with data-row/data-col
_READ_TABLE = """() => {
  const rows = [];
  for (const cell of document.querySelectorAll('#answers [role=gridcell][data-row][data-col]')) {
    const r = +cell.dataset.row, c = +cell.dataset.col;
    (rows[r] = rows[r] || [])[c] = cell.innerText.trim();
  }
  return rows.filter(Boolean);
}"""


def _table_rows(page) -> list[list[str]]:
    return page.evaluate(_READ_TABLE)


def _wait_rows(page, variants: list[str]) -> list[list[str]]:
    """Wait until the table shows one row per variant of `variants`, in order, then return its rows."""
    page.wait_for_function(
        f"""(names) => {{
             const rows = ({_READ_TABLE})();
             return rows.length === names.length && rows.every((r, i) => r[0] === names[i] && r[2]);
           }}""", arg=variants, timeout=TIMEOUT_MS)
    return _table_rows(page)


def test_page_compares_variants_and_recovers_from_an_error(browser, gateway_url, grpc_url, text_model,
                                                           tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(gateway_url)
    page.wait_for_selector("#predict")
    page.wait_for_function("document.querySelector('#triton-status').innerText.includes('is ready')")

    _select_model(page, text_model.name)
    variants = text_model.variant_names
    for variant in variants:  # every python-backend variant, ticked by default
        page.locator(f"#variants input[name='{variant}']").wait_for()
        assert page.locator(f"#variants input[name='{variant}']").is_checked()

    sentence = SENTENCES[0]
    page.locator("#text textarea").fill(sentence)
    page.click("#predict")
    rows = _wait_rows(page, variants)
    expected = _direct_labels(grpc_url, text_model, sentence.encode(), variants)
    for variant, triton_model, prediction, score, round_trip in rows:
        assert triton_model == text_model.variants[variant].name
        assert prediction == expected[variant]
        assert 0.0 <= float(score) <= 1.0
        assert float(round_trip) > 0
    page.get_by_text("Raw JSON answers").click()  # folded away by default
    raw = page.locator("#raw").inner_text()
    assert all(v in raw for v in variants)

    shot = tmp_path / "gateway_page.png"
    page.screenshot(path=str(shot), full_page=True)
    try:
        shutil.copyfile(shot, SCREENSHOT_COPY)
    except OSError:
        pass

    # empty text: a clear error, the page stays usable
    page.locator("#text textarea").fill("")
    page.click("#predict")
    toast = page.locator(".toast-body", has_text="the text is empty")
    toast.first.wait_for()
    assert text_model.name in toast.first.inner_text()

    # the next good request works: tick only the first variant so the table must change to one row
    for variant in variants[1:]:
        page.locator(f"#variants input[name='{variant}']").uncheck()
    sentence = SENTENCES[1]
    page.locator("#text textarea").fill(sentence)
    page.click("#predict")
    rows = _wait_rows(page, variants[:1])
    assert rows[0][2] == _direct_labels(grpc_url, text_model, sentence.encode(), variants[:1])[variants[0]]
    page.close()


# ----------------------------------------------------------------------------------------------- the API

def _rows(table: dict) -> list[list]:
    assert table["headers"][:3] == ["variant", "triton model", "prediction"]
    return table["data"]


def test_api_predict_matches_triton(api, grpc_url, text_model):
    variants = text_model.variant_names
    sentence = SENTENCES[2]
    table, answers = api.predict(text_model.name, sentence, None, variants, api_name="/predict")
    expected = _direct_labels(grpc_url, text_model, sentence.encode(), variants)
    rows = _rows(table)
    assert [r[0] for r in rows] == variants
    assert {r[0]: r[2] for r in rows} == expected
    assert {v: a["label"] for v, a in answers.items()} == expected
    for variant, answer in answers.items():
        assert set(answer["probabilities"]) == set(text_model.labels)
        assert abs(sum(answer["probabilities"].values()) - 1) < 1e-4


@pytest.mark.parametrize("text, variants, message", [
    ("", None, "the text is empty"),
    ("   ", None, "the text is empty"),
    ("a" * 100_000, None, "100000 characters"),
    ("a fine film", ["int4-nonexistent"], "int4-nonexistent"),
    ("a fine film", [], "no variant ticked"),
])
def test_api_bad_input_is_a_clear_error_and_the_next_request_works(api, text_model, text, variants, message):
    from gradio_client.exceptions import AppError

    chosen = text_model.variant_names if variants is None else variants
    with pytest.raises(AppError, match=message):
        api.predict(text_model.name, text, None, chosen, api_name="/predict")
    table, _ = api.predict(text_model.name, SENTENCES[0], None, text_model.variant_names[:1], api_name="/predict")
    assert [r[0] for r in _rows(table)] == text_model.variant_names[:1]


def test_api_image_model(api, grpc_url, image_model, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image
    from sklearn.datasets import load_digits

    digit = load_digits().images[0]  # 8x8, values 0..16
    picture = Image.fromarray((digit * 255 / 16).astype("uint8"), mode="L").resize((64, 64)).convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    png = tmp_path / "digit.png"
    png.write_bytes(buffer.getvalue())
    variants = image_model.variant_names

    table, answers = api.predict(image_model.name, "", handle_file(str(png)), variants, api_name="/predict")
    expected = _direct_labels(grpc_url, image_model, png.read_bytes(), variants)
    assert {r[0]: r[2] for r in _rows(table)} == expected

    not_an_image = tmp_path / "not-an-image.png"
    not_an_image.write_bytes(b"these bytes are not a PNG file" * 10)
    with pytest.raises(AppError, match="not a readable image"):
        api.predict(image_model.name, "", handle_file(str(not_an_image)), variants, api_name="/predict")
    with pytest.raises(AppError, match="no image"):
        api.predict(image_model.name, "", None, variants, api_name="/predict")
    table, _ = api.predict(image_model.name, "", handle_file(str(png)), variants, api_name="/predict")
    assert len(_rows(table)) == len(variants)


def test_triton_status(api, grpc_url):
    status = api.predict(api_name="/triton_status")
    assert "is ready" in status and grpc_url in status


def test_unreachable_triton_shows_a_banner_and_a_clear_error(built_repository, text_model):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    demo = gateway_app.build_app(Path(built_repository), f"127.0.0.1:{free_port()}")  # nothing listens there
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        assert "not reachable" in client.predict(api_name="/triton_status")
        with pytest.raises(AppError, match="not reachable"):
            client.predict(text_model.name, SENTENCES[0], None, text_model.variant_names, api_name="/predict")
    finally:
        demo.close()
