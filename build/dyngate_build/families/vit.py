"""ViT (`ViTForImageClassification`): image classification.

Early-exit cut: embeddings(pixel_values); layer(hidden); ramp/head on the CLS token (LayerNorm-Linear).
Pruning: heads in attention.{q,k,v,o}_proj, FFN in mlp.fc1/fc2.
"""

from __future__ import annotations

import torch
from torch import nn

from dyngate_build.families import IMAGE_CLASSIFICATION, FamilySpec, LayerParts, register


class ImageEmbed(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixel_values)


class ImageLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden)


class ViTHead(nn.Module):
    """ViT's final LayerNorm + classifier on the CLS token (its own weights; also the ramp shape)."""

    def __init__(self, layernorm: nn.LayerNorm, classifier: nn.Linear):
        super().__init__()
        self.layernorm, self.classifier = layernorm, classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layernorm(hidden[:, 0]))


def cut(model: nn.Module) -> dict:
    """`Segments` fields of a ViT classifier (see FamilySpec.early_exit_cut)."""
    dim, labels = int(model.config.hidden_size), int(model.config.num_labels)
    return dict(inputs=("pixel_values",), embed=ImageEmbed(model.vit.embeddings),
                layers=[ImageLayer(l) for l in model.vit.layers], head=ViTHead(model.vit.layernorm, model.classifier),
                num_labels=labels, hidden_size=dim, embed_inputs=("pixel_values",),
                ramp_factory=lambda: ViTHead(nn.LayerNorm(dim, eps=1e-12), nn.Linear(dim, labels)))


SPEC = register(FamilySpec(
    model_type="vit", task=IMAGE_CLASSIFICATION, hf_class="ViTForImageClassification",
    onnx_inputs=("pixel_values",),
    dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, client_input="IMAGE",
    head_modules=("classifier", "pre_classifier", "pooler"),
    early_exit_cut=cut,
    pruning_layers=("vit.layers", LayerParts(
        "attention", "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
        "num_attention_heads", "head_dim", None, "mlp.fc1", "mlp.fc2"))))
