"""Early exit (DeeBERT, Xin et al. 2020): a model cut into segments, and the per-sample exit rule.

A model is cut into segments: `embeddings`, one `layer_<i>` per transformer layer (1-based), one `ramp_<i>`
(off-ramp classifier) after each layer listed in `exit_layers`, and `head` (the model's own classifier after
the last layer). At inference a sample leaves at the first ramp whose confidence reaches the threshold;
samples that leave drop out of the batch and the rest continue, so layers after an exit are never computed.
A threshold of 1.0 or above never exits: the answer is then the full model's (same layers, same head).

Confidence (`criterion`):
- "max_prob": the largest softmax probability;
- "entropy": 1 - H(p) / log(C) (1 = one-hot, 0 = uniform), so both criteria share the [0, 1] scale.
Token classification (DeBERTa NER; Li et al. 2021, sentence-level exit for sequence labelling) exits a
sentence when EVERY real token is confident: the minimum over the attention mask (padding ignored).

Segments pass named tensors along (the engines chain them by name, nothing is family-specific there):
the embeddings segment takes graph inputs (`embed_inputs`) and returns `hidden` plus `state` tensors that
every layer takes again (`layer_inputs`); `shared` names have no batch axis and are not sliced when rows
exit. The cut of each HF `model_type` is its family module's `early_exit_cut` (build/dyngate_build/families/).

Ramp training is in `ramps`, the exporters in `onnx_export` and `torchscript_export` (same segments, same
decision rule as build/dyngate_build/runtime.py's engines), the threshold rule and curve in `thresholds`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from dyngate_build.errors import ConfigError
from dyngate_build.families import family_for, registered_families

CRITERIA = ("max_prob", "entropy")

# ---------------------------------------------------------------------------------------------- validation

def num_layers(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "n_layers", None) or getattr(config, "num_hidden_layers"))


def cut_families() -> list[str]:
    """The registered model types early exit can cut (FamilySpec.early_exit_cut set)."""
    return [t for t, spec in registered_families().items() if spec.early_exit_cut is not None]


def check_family(model_type: str) -> None:
    """ConfigError unless `model_type` is a registered family with an early-exit cut."""
    supported = cut_families()
    if model_type not in supported:
        raise ConfigError(f"early exit supports model types {', '.join(supported)}; {model_type!r} has no segment "
                          f"cut (FamilySpec.early_exit_cut in build/dyngate_build/families/); drop early-exit/stacked "
                          f"for it")


def check_model(model: nn.Module, model_type: str) -> None:
    """Refuse checkpoints of a supported family whose forward the segments do not reproduce."""
    check_family(model_type)
    check = family_for(model_type).early_exit_check
    if check is not None:
        check(model)


def resolve_exit_layers(exit_layers, layers: int) -> list[int]:
    """Ramp positions (1-based layer numbers) for a model of `layers` layers.

    None -> every layer but the last (the last layer's exit is the model's own head). A list naming a layer
    outside 1..layers-1 raises ConfigError.
    """
    if exit_layers is None:
        return list(range(1, layers))
    chosen = sorted(set(int(x) for x in exit_layers))
    bad = [x for x in chosen if not 1 <= x <= layers - 1]
    if bad or not chosen:
        raise ConfigError(f"exit_layers={list(exit_layers)!r} names layer(s) {bad or '(none)'} the model lacks: "
                          f"this model has {layers} layers, ramps may sit after layers 1..{layers - 1} "
                          f"(the last layer exits through the model's own head)")
    return chosen



# ---------------------------------------------------------------------------------------------- segments

@dataclass
class Segments:
    """A model cut for early exit. layers[i] is layer i+1; ramps maps layer number -> ramp module.

    inputs: graph inputs in order; embed_inputs: those the embeddings segment takes; state: tensors the
    embeddings segment returns after `hidden`; layer_inputs: what every layer takes, in order ("hidden",
    graph inputs, state names); shared: state names without a batch axis; axes: per tensor name, axis ->
    "batch" | "sequence" (dynamic axes of the exports); token_level: per-token logits, sentence-level exit.
    example: example graph inputs (batch and sequence ≥2) for tracing and export.
    ramp_factory: makes a fresh off-ramp shaped like the family's own head.
    """

    model_type: str
    inputs: tuple[str, ...]
    embed: nn.Module
    layers: list[nn.Module]
    head: nn.Module
    ramps: dict[int, nn.Module]
    num_labels: int
    hidden_size: int
    embed_inputs: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    layer_inputs: tuple[str, ...] = ("hidden",)
    shared: tuple[str, ...] = ()
    axes: dict = field(default_factory=dict)
    token_level: bool = False
    example: dict = field(default_factory=dict)
    ramp_factory: Callable[[], nn.Module] | None = None

    @property
    def uses_mask(self) -> bool:
        return "attention_mask" in self.inputs

    def modules(self) -> list[nn.Module]:
        return [self.embed, *self.layers, self.head, *self.ramps.values()]

    def eval(self) -> "Segments":
        for m in self.modules():
            m.eval()
        return self

    def start(self, inputs: dict) -> dict:
        """Run the embeddings segment: {graph inputs, "hidden", state...} (the tensors layers pick from)."""
        env = {name: inputs[name] for name in self.inputs}
        out = self.embed(*[env[name] for name in self.embed_inputs])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        env["hidden"] = outs[0]
        env.update(zip(self.state, outs[1:]))
        return env

    def run_layer(self, index: int, env: dict) -> torch.Tensor:
        return self.layers[index](*[env[name] for name in self.layer_inputs])

    def keep(self, env: dict, rows: torch.Tensor) -> dict:
        """`env` restricted to `rows` (a bool mask or indices over the batch); shared tensors stay whole."""
        return {k: (v if k in self.shared else v[rows]) for k, v in env.items()}

    @torch.no_grad()
    def hidden_states(self, inputs: dict) -> list[torch.Tensor]:
        """Hidden states after every layer (index i = after layer i+1), no exit."""
        env = self.start(inputs)
        states = []
        for i in range(len(self.layers)):
            env["hidden"] = self.run_layer(i, env)
            states.append(env["hidden"])
        return states

    @torch.no_grad()
    def full_logits(self, inputs: dict) -> torch.Tensor:
        return self.head(self.hidden_states(inputs)[-1])



def segment_model(model: nn.Module, model_type: str, exit_layers: list[int] | None = None,
                  seed: int = 0) -> Segments:
    """Cut an HF model (a deep copy; eager attention) into segments with fresh ramps after `exit_layers`."""
    from dyngate_build.export import example_inputs

    check_model(model, model_type)
    model = copy.deepcopy(model).float().eval()
    model.config._attn_implementation = "eager"  # explicit additive mask; exports to ONNX and TorchScript
    for p in model.parameters():
        p.requires_grad_(False)
    positions = resolve_exit_layers(exit_layers, num_layers(model))
    family = family_for(model_type)
    segments = Segments(model_type=model_type, ramps={}, **family.early_exit_cut(model))
    segments.example = dict(zip(family.onnx_inputs, example_inputs(model, family)))
    sequence_axis = {1: "sequence"} if segments.uses_mask else {}
    inputs_axes = {name: family.dynamic_axes[name] for name in family.onnx_inputs}
    segments.axes = {**inputs_axes, "hidden": {0: "batch", **sequence_axis}, **segments.axes}
    torch.manual_seed(seed)
    for position in positions:
        segments.ramps[position] = segments.ramp_factory()
    return segments.eval()



# ---------------------------------------------------------------------------------------------- decision rule

def confidence(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-row confidence in [0, 1] (see module docstring); logits [..., C] -> [...]."""
    probs = torch.softmax(logits.float(), dim=-1)
    if criterion == "max_prob":
        return probs.max(dim=-1).values
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
    return 1.0 - entropy / float(np.log(logits.shape[-1]))


def sentence_confidence(logits: torch.Tensor, attention_mask: torch.Tensor, criterion: str) -> torch.Tensor:
    """Token logits [B, L, C] -> [B]: the least confident real token of each sentence (padding ignored)."""
    conf = confidence(logits, criterion)
    return torch.where(attention_mask.bool(), conf, torch.full_like(conf, float("inf"))).amin(dim=1)


@torch.no_grad()
def predict_with_exit(segments: Segments, inputs: dict, threshold: float, criterion: str = "max_prob",
                      calls: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the engines: (logits, exit_layer) with per-sample exit; `calls` counts segments."""
    env = segments.start(inputs)
    hidden = env["hidden"]
    batch = hidden.shape[0]
    shape = (batch, hidden.shape[1], segments.num_labels) if segments.token_level else (batch, segments.num_labels)
    out = torch.zeros(shape)
    exit_layer = torch.full((batch,), len(segments.layers), dtype=torch.long)
    active = torch.arange(batch)
    for i in range(len(segments.layers)):
        env["hidden"] = segments.run_layer(i, env)
        if calls is not None:
            calls[f"layer_{i + 1}"] = calls.get(f"layer_{i + 1}", 0) + 1
        ramp = segments.ramps.get(i + 1)
        if ramp is None or threshold >= 1.0:
            continue
        logits = ramp(env["hidden"])
        conf = (sentence_confidence(logits, env["attention_mask"], criterion) if segments.token_level
                else confidence(logits, criterion))
        done = conf >= threshold
        if bool(done.any()):
            out[active[done]] = logits[done]
            exit_layer[active[done]] = i + 1
            keep = ~done
            active, env = active[keep], segments.keep(env, keep)
            if active.numel() == 0:
                return out, exit_layer
    out[active] = segments.head(env["hidden"])
    return out, exit_layer

