"""Every registered model family (build/dyngate_build/families/) on a tiny random model of its HF class: the ONNX
export makes exactly the spec's dynamic axes dynamic and runs at other sizes, the early-exit cut reproduces the
model, the pruning parts and head modules name real modules. A registered family without a case here fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dyngate_build.families import registered_families


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=200, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40)).eval()


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3)).eval()


def _deberta():
    from transformers import DebertaV2Config, DebertaV2ForTokenClassification

    torch.manual_seed(0)
    return DebertaV2ForTokenClassification(DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, norm_rel_ebd="layer_norm", num_labels=3)).eval()


# One case per registered model_type: a tiny model of the family's HF class.
FAMILY_CASES = {"distilbert": _distilbert, "vit": _vit, "deberta-v2": _deberta}


def _inputs(model, family, batch: int, sequence: int) -> dict:
    if family.is_text:
        ids = torch.randint(5, 90, (batch, sequence))
        mask = torch.ones_like(ids)
        mask[0, sequence - 2:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    size = model.config.image_size
    return {"pixel_values": torch.randn(batch, 3, size, size)}


def test_every_registered_family_has_a_case():
    assert set(registered_families()) == set(FAMILY_CASES)


@pytest.mark.parametrize("model_type", sorted(FAMILY_CASES))
def test_family_export_axes_cut_parts_and_heads(model_type, tmp_path):
    import onnx
    import onnxruntime as ort

    from dyngate_build.export import export_onnx
    from dyngate_build.techniques.early_exit.segments import segment_model

    family = registered_families()[model_type]
    model = FAMILY_CASES[model_type]()
    assert type(model).__name__ == family.hf_class and model.config.model_type == model_type

    path = export_onnx(model, family, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        dynamic = {i for i, d in enumerate(dims) if d.dim_param or not d.HasField("dim_value")}
        assert dynamic == set(family.dynamic_axes[value.name]), value.name
    assert [i.name for i in graph.input] == list(family.onnx_inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = _inputs(model, family, 3, 7)
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        want = model(**inputs).logits.numpy()
    np.testing.assert_allclose(got, want, atol=family.fp32_tolerance)

    if family.early_exit_cut is not None:
        segments = segment_model(model, model_type)
        full = segments.full_logits(inputs).numpy()
        if segments.token_level:
            mask = inputs["attention_mask"].numpy().astype(bool)
            full, want = full[mask], want[mask]
        np.testing.assert_allclose(full, want, atol=1e-4)

    if family.pruning_layers is not None:
        path, parts = family.pruning_layers
        layer = next(iter(model.get_submodule(path)))
        for name in (parts.query, parts.key, parts.value, parts.out, parts.ffn_in, parts.ffn_out):
            assert isinstance(layer.get_submodule(name), torch.nn.Linear), name
        assert hasattr(layer.get_submodule(parts.attention), parts.heads_attr)

    module_parts = {part for name, _ in model.named_modules() for part in name.split(".")}
    assert any(head in module_parts for head in family.head_modules)
