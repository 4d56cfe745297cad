"""DeBERTa-v2/v3 (`DebertaV2ForTokenClassification`): token classification (NER).

Early-exit cut: embeddings(input_ids, attention_mask) also computes what its encoder computes once — the
pairwise mask `extended_mask` [B, 1, L, L], `relative_pos` [1, L, L] and the (LayerNorm-ed) `rel_embeddings`
[2k, D] — and each layer takes (hidden, extended_mask, relative_pos, rel_embeddings); ramps are per-token
Linear layers shaped like its own classifier. Checkpoints with a convolution after the first layer
(`conv_kernel_size`), `z_steps` or without relative attention are refused by `check_early_exit`.
Structured pruning is not supported (its relative-position projections share the head layout).
"""

from __future__ import annotations

import torch
from torch import nn

from dyngate_build.errors import ConfigError
from dyngate_build.families import TEXT_AXES, TOKEN_CLASSIFICATION, FamilySpec, register


class DebertaEmbed(nn.Module):
    """DeBERTa-v2 embeddings (masked) plus what its encoder computes once for all layers.

    forward(input_ids, attention_mask) -> (hidden [B, L, D], extended_mask [B, 1, L, L] int64,
    relative_pos [1, L, L] int64, rel_embeddings [2k, D]), exactly as DebertaV2Model.forward and
    DebertaV2Encoder.forward compute them.
    """

    def __init__(self, embeddings: nn.Module, encoder: nn.Module):
        super().__init__()
        self.embeddings, self.encoder = embeddings, encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.embeddings(input_ids=input_ids, mask=attention_mask)
        return (hidden, self.encoder.get_attention_mask(attention_mask), self.encoder.get_rel_pos(hidden),
                self.encoder.get_rel_embedding())


class DebertaLayer(nn.Module):
    """One DebertaV2Layer fed the encoder's precomputed mask and relative positions."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, extended_mask: torch.Tensor, relative_pos: torch.Tensor,
                rel_embeddings: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden, extended_mask, relative_pos=relative_pos, rel_embeddings=rel_embeddings)[0]


class TokenHead(nn.Module):
    """A token classifier: one Linear over every position, [B, L, D] -> [B, L, C] (DeBERTa's own head shape)."""

    def __init__(self, classifier: nn.Linear):
        super().__init__()
        self.classifier = classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)


def check_early_exit(model: nn.Module) -> None:
    """Refuse DeBERTa checkpoints whose forward the segments do not reproduce (ConfigError)."""
    config = model.config
    if not getattr(config, "relative_attention", False):
        raise ConfigError("early exit for deberta-v2 needs relative_attention=True (every DeBERTa-v2/v3 "
                          "checkpoint has it); this config has none")
    if getattr(config, "conv_kernel_size", 0) > 0:
        raise ConfigError(f"early exit for deberta-v2 does not cut models with a convolution after the first "
                          f"layer (conv_kernel_size={config.conv_kernel_size}); drop early-exit for this checkpoint")
    if getattr(getattr(model, "deberta", None), "z_steps", 0) > 1:
        raise ConfigError("early exit for deberta-v2 does not cut models with z_steps > 1")


def cut(model: nn.Module) -> dict:
    """`Segments` fields of a DeBERTa-v2 token classifier (see FamilySpec.early_exit_cut)."""
    encoder = model.deberta.encoder
    dim, labels = int(model.config.hidden_size), int(model.config.num_labels)
    state = ("extended_mask", "relative_pos", "rel_embeddings")
    return dict(inputs=("input_ids", "attention_mask"), embed=DebertaEmbed(model.deberta.embeddings, encoder),
                layers=[DebertaLayer(l) for l in encoder.layer], head=TokenHead(model.classifier),
                num_labels=labels, hidden_size=dim, ramp_factory=lambda: TokenHead(nn.Linear(dim, labels)),
                embed_inputs=("input_ids", "attention_mask"), state=state, layer_inputs=("hidden", *state),
                shared=("relative_pos", "rel_embeddings"), token_level=True,
                axes={"extended_mask": {0: "batch", 2: "sequence", 3: "sequence"},
                      "relative_pos": {1: "sequence", 2: "sequence"}, "rel_embeddings": {}})


SPEC = register(FamilySpec(
    model_type="deberta-v2", task=TOKEN_CLASSIFICATION, hf_class="DebertaV2ForTokenClassification",
    onnx_inputs=("input_ids", "attention_mask"),
    dynamic_axes={**TEXT_AXES, "logits": {0: "batch", 1: "sequence"}}, client_input="TEXT",
    head_modules=("classifier", "pre_classifier", "pooler"),
    early_exit_cut=cut, early_exit_check=check_early_exit,
    pruning_note="DeBERTa's relative-position projections share the head layout"))
