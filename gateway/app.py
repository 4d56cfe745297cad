"""The dyngate gateway: a Gradio app in front of a running Triton that serves a dyngate model repository.

Layout only: the handlers live in `gateway/handlers.py`. One `gr.Tab` per view; add a view by adding a
`_<view>_tab(...)` function and calling it inside `build_app`.

Views:
- Predict: pick a model, type text (text models) or upload an image (image models), tick variants, Predict:
  each variant's answer and round trip side by side, plus the raw JSON answers.

API endpoints (gradio_client, by name):
- "predict": (model, text, image file or None, variants) -> (table {headers, data}, {variant: answer})
- "model_info": (model) -> the page's updates for that model (variant choices, description, inputs)
- "triton_status": () -> the status line (is Triton reachable, which variants are loaded)

    dyngate gateway --repository model_repository --triton 127.0.0.1:8001     # http://127.0.0.1:7860
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from gateway import handlers
from gateway.handlers import RESULT_HEADERS, ClientPool, ModelView

TITLE = "dyngate gateway"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


def _table(rows: list[list] | None = None) -> pd.DataFrame:
    rows = [["" if cell is None else cell for cell in row] for row in rows or []]
    return pd.DataFrame(rows, columns=RESULT_HEADERS)


def _predict_tab(catalog: dict[str, ModelView], clients: ClientPool):
    """The Predict view: one input to several variants of one model, answers side by side.

    Returns (on_model, model dropdown, its outputs) so the page can narrow the variants on load."""
    first = next(iter(catalog.values()), None)
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
        text = gr.Textbox(label="Text", lines=3, placeholder="a gripping, beautifully acted film",
                          visible=first.is_text if first else True, elem_id="text")
        with gr.Row(visible=bool(first and not first.is_text)) as image_row:
            image = gr.File(label="Image (PNG, JPEG, BMP, GIF)", file_types=["image"], type="filepath",
                            elem_id="image")
            preview = gr.Image(label="Preview", interactive=False, height=160, elem_id="preview")
        predict = gr.Button("Predict", variant="primary", elem_id="predict")
        table = gr.Dataframe(value=_table(), headers=RESULT_HEADERS, label="Answers", interactive=False,
                             wrap=True, elem_id="answers")
        raw = gr.JSON(label="Raw answers (by variant)", elem_id="raw")

    def on_model(name: str | None):
        view = catalog.get(name or "")
        if view is None:
            return (gr.update(choices=[], value=[]), "Pick a model.", gr.update(), gr.update())
        return (gr.update(choices=view.variant_names, value=view.variant_names), view.describe(),
                gr.update(visible=view.is_text), gr.update(visible=not view.is_text))

    @handlers.user_errors
    def on_predict(name: str | None, text_value: str | None, image_path: str | None, chosen: list[str] | None):
        view = catalog.get(name or "")
        if view is None:
            raise handlers.InputError(f"unknown model {name!r}; the repository's models are: "
                                      f"{', '.join(catalog) or 'none (run dyngate build)'}")
        result = handlers.compare_variants(clients, view, text_value, image_path, chosen)
        return _table(result.rows), result.answers

    def on_image(path: str | None):
        return handlers.image_preview(path)

    outputs = [variants, info, text, image_row]
    model.change(on_model, model, outputs, api_name="model_info")
    gr.on([model.change], lambda: (_table(), None), None, [table, raw], api_visibility="private")
    image.change(on_image, image, preview, api_visibility="private")
    predict.click(on_predict, [model, text, image, variants], [table, raw], api_name="predict")
    text.submit(on_predict, [model, text, image, variants], [table, raw], api_visibility="private")
    return on_model, model, outputs


def build_app(repository: Path, triton_url: str) -> gr.Blocks:
    """The gateway page for `repository`, answered by the Triton at `triton_url` (gRPC "host:port", or a url
    with a grpc:// or http:// scheme). Models are read from the repository once, here."""
    catalog = handlers.load_catalog(Path(repository))
    clients = ClientPool(triton_url)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nModel repository `{repository}` · Triton `{clients.url}`")
        status = gr.Markdown(elem_id="triton-status")
        on_model, model, model_outputs = _predict_tab(catalog, clients)

        def on_load():
            return handlers.triton_status(clients, catalog)[1]

        demo.load(on_load, None, status, api_name="triton_status")
        demo.load(on_model, model, model_outputs, api_visibility="private")
    return demo


def launch(repository: Path, triton_url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **kwargs):
    """Build the gateway and serve it on host:port until interrupted (kwargs go to `gr.Blocks.launch`)."""
    demo = build_app(repository, triton_url)
    return demo.launch(server_name=host, server_port=port, **kwargs)
