"""How the Predict tab draws answers, as plain values for Gradio's components (no layout here).

- text classification: class probabilities for `gr.Label` (bars), `label_confidences`;
- token classification (NER): the text with its entity spans for `gr.HighlightedText`, `highlighted_entities`;
- image classification: the image itself beside the same bars.

The page opens on a text-classification model (`default_model`) with a placeholder that fits the model's task
(`placeholder`).
"""

from __future__ import annotations

from dyngate_gateway.handlers import ModelView

TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, IMAGE_CLASSIFICATION = (
    "text-classification", "token-classification", "image-classification")
PLACEHOLDERS = {
    TEXT_CLASSIFICATION: "a gripping, beautifully acted film",
    TOKEN_CLASSIFICATION: "Angela Merkel met Emmanuel Macron in Paris before flying back to Berlin .",
}
DEFAULT_PLACEHOLDER = "type a text"
TOP_CLASSES = 5  # bars drawn per answer (all of them for two-class sentiment; the five likeliest digits)


def default_model(catalog: dict[str, ModelView]) -> ModelView | None:
    """The model the page opens on: the first text-classification model, else the first model, else None."""
    views = list(catalog.values())
    return next((v for v in views if v.task == TEXT_CLASSIFICATION), views[0] if views else None)


def placeholder(view: ModelView | None) -> str:
    """An example input fitting `view`'s task (a film review for sentiment, a sentence with names for NER)."""
    return PLACEHOLDERS.get(view.task if view else "", DEFAULT_PLACEHOLDER)


def label_confidences(answer: dict) -> dict[str, float]:
    """{class: probability} of a classification answer (what `gr.Label` draws as bars); {} without one."""
    probabilities = answer.get("probabilities") or {}
    if probabilities:
        return {str(k): float(v) for k, v in probabilities.items()}
    if answer.get("label") is not None and answer.get("score") is not None:
        return {str(answer["label"]): float(answer["score"])}
    return {}


def highlighted_entities(text: str, answer: dict) -> dict:
    """{"text", "entities": [{"entity", "start", "end"}]} of an NER answer, the value `gr.HighlightedText` draws:
    each entity span (character offsets into `text`) highlighted with its type."""
    entities = [{"entity": str(e["entity"]), "start": int(e["start"]), "end": int(e["end"])}
                for e in answer.get("entities") or [] if e.get("start") is not None and e.get("end") is not None]
    return {"text": text, "entities": entities}


def headline(variant: str, answer: dict, latency_ms: float | None) -> str:
    """One Markdown line over a variant's drawn answer: its name, round trip and early-exit layer."""
    bits = [f"**{variant}**"]
    if latency_ms is not None:
        bits.append(f"{latency_ms:.2f} ms")
    if answer.get("exit_layer") is not None:
        bits.append(f"exit layer {answer['exit_layer']}")
    if answer.get("error"):
        bits.append(f"error: {answer['error']}")
    return " · ".join(bits)


def arms_table(arms: dict[str, dict]) -> str:
    """A Markdown table of the `ab` policy's arms (Router.ab_report): weight, requests, p50/p99, agreement."""
    lines = ["| arm | weight | requests | p50 ms | p99 ms | top-1 agreement | max \\|Δ\\| | compared with (copies) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, r in arms.items():
        a = r.get("agreement") or {}
        cells = [f"`{arm}`", f"{r['weight']:g}", str(r["requests"]), _ms(r["p50_ms"]), _ms(r["p99_ms"]),
                 "n/a" if a.get("top1_agreement") is None else f"{100 * a['top1_agreement']:.1f} %",
                 "n/a" if a.get("max_abs_delta") is None else f"{a['max_abs_delta']:.3g}",
                 f"`{a['compared_with']}` ({a['mirrored']})" if a else "not yet"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
