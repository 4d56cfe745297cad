"""DistilBERT (`DistilBertForSequenceClassification`): text classification.

Early-exit cut: embeddings(input_ids); layer(hidden, attention_mask); ramp/head on [CLS] (Linear-ReLU-Linear,
like its own head). Pruning: heads in attention.{q,k,v,out}_lin, FFN in ffn.lin1/lin2.
"""

from __future__ import annotations

import torch
from torch import nn

from dyngate_build.families import TEXT_AXES, TEXT_CLASSIFICATION, FamilySpec, LayerParts, register


class TextEmbed(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)


class MaskedLayer(nn.Module):
    """A transformer layer taking the 2-D attention mask (int64 [B, L]); builds the additive 4-D mask itself."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        return self.layer(hidden, attention_mask=additive)


class DistilBertHead(nn.Module):
    """DistilBERT's classifier on [CLS]: pre_classifier -> ReLU -> classifier (the model's own weights)."""

    def __init__(self, pre_classifier: nn.Linear, classifier: nn.Linear):
        super().__init__()
        self.pre_classifier, self.classifier = pre_classifier, classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.pre_classifier(hidden[:, 0])))


def cut(model: nn.Module) -> dict:
    """`Segments` fields of a DistilBERT classifier (see FamilySpec.early_exit_cut)."""
    dim, labels = int(model.config.dim), int(model.config.num_labels)
    return dict(inputs=("input_ids", "attention_mask"), embed=TextEmbed(model.distilbert.embeddings),
                layers=[MaskedLayer(l) for l in model.distilbert.transformer.layer],
                head=DistilBertHead(model.pre_classifier, model.classifier), num_labels=labels, hidden_size=dim,
                embed_inputs=("input_ids",), layer_inputs=("hidden", "attention_mask"),
                ramp_factory=lambda: DistilBertHead(nn.Linear(dim, dim), nn.Linear(dim, labels)))


SPEC = register(FamilySpec(
    model_type="distilbert", task=TEXT_CLASSIFICATION, hf_class="DistilBertForSequenceClassification",
    onnx_inputs=("input_ids", "attention_mask"),
    dynamic_axes={**TEXT_AXES, "logits": {0: "batch"}}, client_input="TEXT",
    head_modules=("classifier", "pre_classifier", "pooler"),
    early_exit_cut=cut,
    pruning_layers=("distilbert.transformer.layer", LayerParts(
        "attention", "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
        "n_heads", "attention_head_size", "dim", "ffn.lin1", "ffn.lin2"))))
