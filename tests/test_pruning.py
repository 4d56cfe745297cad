"""Pruning: head/FFN shapes and bookkeeping (DistilBERT, ViT), KD recovery through dyngate_build.training, ONNX with
the smaller shapes, unstructured sparsity, bad ratios."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dyngate_build.errors import ConfigError
from dyngate_build.techniques.pruning.core import (head_scores, layers_of, num_parameters, prune_heads, prune_structured,
                                                   sparsify)


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=200, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40,
        initializer_range=0.3)).eval()


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3)).eval()


def _inputs(model_type):
    if model_type == "distilbert":
        ids = torch.randint(5, 200, (3, 9))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"pixel_values": torch.randn(3, 3, 16, 16)}


@pytest.mark.parametrize("model_type,make", [("distilbert", _distilbert), ("vit", _vit)])
def test_structured_pruning_shapes_and_bookkeeping(model_type, make):
    model = make()
    before = num_parameters(model)
    result = prune_structured(model, model_type, head_ratio=0.5, ffn_ratio=0.5)
    layers, parts = layers_of(model, model_type)
    for index, layer in enumerate(layers):
        attention = getattr(layer, "attention")
        heads = getattr(attention, parts.heads_attr)
        size = getattr(attention, parts.head_size_attr)
        assert heads == 2 and result["heads"][index] == 2
        assert len(result["pruned_heads"][index]) == 2 and attention.pruned_heads == set(result["pruned_heads"][index])
        q = layer.get_submodule(parts.query)
        out = layer.get_submodule(parts.out)
        assert q.weight.shape[0] == heads * size and out.weight.shape[1] == heads * size
        assert layer.get_submodule(parts.ffn_in).weight.shape[0] == 32
        assert layer.get_submodule(parts.ffn_out).weight.shape[1] == 32
    assert model.config.pruned_heads == {str(k): v for k, v in result["pruned_heads"].items()}
    assert num_parameters(model) < before
    with torch.no_grad():
        logits = model(**_inputs(model_type)).logits
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()


def test_removing_a_head_equals_zeroing_its_output():
    """Pruning a head gives exactly what the unpruned model gives with that head's o_proj columns zeroed."""
    model = _distilbert()
    zeroed = copy.deepcopy(model)
    layers, parts = layers_of(model, "distilbert")
    size = layers[0].attention.attention_head_size
    zeroed.distilbert.transformer.layer[0].attention.out_lin.weight.data[:, size:2 * size] = 0
    prune_heads(layers[0], parts, [1])
    inputs = _inputs("distilbert")
    with torch.no_grad():
        np.testing.assert_allclose(model(**inputs).logits.numpy(), zeroed(**inputs).logits.numpy(), atol=1e-5)


def test_head_scores_pick_the_weakest_head():
    model = _distilbert()
    layers, parts = layers_of(model, "distilbert")
    attention = layers[0].attention
    size = attention.attention_head_size
    for lin in (attention.q_lin, attention.k_lin, attention.v_lin):
        lin.weight.data[2 * size:3 * size] *= 0.01
    assert int(torch.argmin(head_scores(layers[0], parts))) == 2
    result = prune_structured(model, "distilbert", head_ratio=0.25, ffn_ratio=0.0)
    assert result["pruned_heads"][0] == [2]


def test_pruned_model_exports_to_onnx_with_smaller_shapes(tmp_path):
    import onnx
    import onnxruntime as ort

    from dyngate_build.export import export_onnx
    from dyngate_build.families import family_for

    model = _distilbert()
    prune_structured(model, "distilbert", 0.5, 0.5)
    path = export_onnx(model, family_for("distilbert"), tmp_path / "pruned.onnx")
    shapes = {tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}
    assert not any(64 in s for s in shapes)  # FFN 64 -> 32 everywhere
    assert any(16 in s for s in shapes)  # q/k/v: 4 heads x 8 -> 2 heads x 8
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = _inputs("distilbert")
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**inputs).logits.numpy(), atol=1e-4)


def test_kd_recovery_moves_student_towards_teacher():
    from dyngate_build.techniques.pruning.core import recover_with_kd
    from dyngate_build.training import TrainingConfig

    teacher = _distilbert()
    student = copy.deepcopy(teacher)
    prune_structured(student, "distilbert", 0.5, 0.5)
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(5, 200, (16, 10)).astype(np.int64),
              "attention_mask": np.ones((16, 10), dtype=np.int64)} for _ in range(4)]
    inputs = {k: torch.from_numpy(v) for k, v in feeds[0].items()}

    def gap():
        with torch.no_grad():
            return float((student(**inputs).logits - teacher(**inputs).logits).abs().mean())

    before = gap()
    result = recover_with_kd(student, teacher, feeds, TrainingConfig(micro_batch_size=16, learning_rate=5e-3,
                                                                     max_steps=30, log_every=1000))
    assert result["steps"] == 30 and result["final_loss"] < result["first_loss"] and gap() < before


def test_sparsify_reaches_the_sparsity():
    model = _distilbert()
    report = sparsify(model, 0.6)
    assert abs(report["linear_sparsity"] - 0.6) < 0.01
    assert not any(hasattr(m, "weight_orig") for m in model.modules())  # permanent


@pytest.mark.parametrize("technique,options,message", [
    ("pruned", {"ratio": 1.0}, "ratio"),
    ("pruned", {"head_ratio": 1.2}, "head_ratio"),
    ("pruned", {"zero_stage": 5}, "zero_stage"),
    ("sparse", {"sparsity": 1.0}, "sparsity"),
])
def test_bad_settings_raise(technique, options, message):
    from dyngate_build.techniques import make_config

    with pytest.raises(ConfigError, match=message):
        make_config(technique, options)


def test_deberta_is_refused_before_work():
    from dyngate_build.techniques.pruning.core import check_family

    with pytest.raises(ConfigError, match="deberta-v2"):
        check_family("deberta-v2")
