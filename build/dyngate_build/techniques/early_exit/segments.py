"""Early exit (DeeBERT, Xin et al. 2020): off-ramps after transformer layers, trained with the backbone frozen
(or, as an option, jointly with it).

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
exit. One cut per HF `model_type`, in the flat table `CUTS`:
- distilbert: embeddings(input_ids); layer(hidden, attention_mask); ramp/head on [CLS]
  (Linear-ReLU-Linear, like its own head).
- vit: embeddings(pixel_values); layer(hidden); ramp/head on the CLS token (LayerNorm-Linear).
- deberta-v2 (token classification): embeddings(input_ids, attention_mask) also computes what its encoder
  computes once — the pairwise mask `extended_mask` [B, 1, L, L], `relative_pos` [1, L, L] and the
  (LayerNorm-ed) `rel_embeddings` [2k, D] — and each layer takes (hidden, extended_mask, relative_pos,
  rel_embeddings); ramps are per-token Linear layers shaped like its own classifier. Checkpoints with a
  convolution after the first layer (`conv_kernel_size`), `z_steps` or without relative attention are
  refused by `check_model`.

Ramp training (`train_ramps`, through dyngate_build.training on the DeepSpeed engine), one label per sequence, or for
token tasks one label per token (`token_labels`: every real token labelled, padding ignored):
- "frozen" (DeeBERT's second stage, the default): the backbone runs once over the training batches, the ramp
  inputs are cached and only the ramps train; loss = mean cross-entropy of the ramps. The full model (never
  exit) stays the source model.
- "joint" (Kaya et al. 2019 shallow-deep networks; Zhou et al. 2020 PABEE): embeddings, layers, the model's own
  head and the ramps train together on loss = sum_k w_k CE_k over every exit k (the ramps and the head after
  the last layer), w_k proportional to k ("depth") or equal ("uniform"), normalised to sum 1. The backbone
  and head take their own (smaller) learning rate. The full model changes: it is a different model from the
  source, and what "never exit" answers is this jointly trained full model.

Exports (same segments, same decision rule as build/dyngate_build/runtime.py's engines):
- ONNX: one graph per segment in a folder with `early_exit.json`; `runtime.EarlyExitOnnxEngine` chains them.
- TorchScript: `torch.jit.script` of `ScriptedEarlyExit`, a loop over traced segments with per-sample exit;
  forward(*graph inputs, threshold) -> (logits, exit_layer).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import torch
from torch import nn

from dyngate_build.errors import ConfigError, ExportError, check_choice, check_range

log = logging.getLogger("dyngate.early_exit")

CRITERIA = ("max_prob", "entropy")
MANIFEST = "early_exit.json"
IGNORE = -100  # token label ignored by the ramp loss (padding)
TRAINING_MODES = ("frozen", "joint")
JOINT_WEIGHTS = ("depth", "uniform")


# ---------------------------------------------------------------------------------------------- validation

def num_layers(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "n_layers", None) or getattr(config, "num_hidden_layers"))


def check_family(model_type: str) -> None:
    if model_type not in CUTS:
        raise ConfigError(f"early exit supports model types {', '.join(CUTS)}; {model_type!r} has no segment "
                          f"cut in build/dyngate_build/early_exit.py (CUTS); drop early-exit/stacked for it")


def check_model(model: nn.Module, model_type: str) -> None:
    """Refuse checkpoints of a supported family whose forward the segments do not reproduce."""
    check_family(model_type)
    if model_type != "deberta-v2":
        return
    config = model.config
    if not getattr(config, "relative_attention", False):
        raise ConfigError("early exit for deberta-v2 needs relative_attention=True (every DeBERTa-v2/v3 "
                          "checkpoint has it); this config has none")
    if getattr(config, "conv_kernel_size", 0) > 0:
        raise ConfigError(f"early exit for deberta-v2 does not cut models with a convolution after the first "
                          f"layer (conv_kernel_size={config.conv_kernel_size}); drop early-exit for this checkpoint")
    if getattr(getattr(model, "deberta", None), "z_steps", 0) > 1:
        raise ConfigError("early exit for deberta-v2 does not cut models with z_steps > 1")


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


def check_threshold(field: str, value: float) -> float:
    """Thresholds live in [0, 1]; 1.0 means never exit."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}={value!r} is not a number; give a value in [0, 1] (1.0 = never exit)") from None
    if not np.isfinite(value):
        raise ConfigError(f"{field}={value!r} is not finite; give a value in [0, 1]")
    check_range(field, value, 0.0, 1.0)
    return value


# ---------------------------------------------------------------------------------------------- segments

class TextEmbed(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)


class ImageEmbed(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixel_values)


class MaskedLayer(nn.Module):
    """A transformer layer taking the 2-D attention mask (int64 [B, L]); builds the additive 4-D mask itself."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        return self.layer(hidden, attention_mask=additive)


class ImageLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden)


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


class DistilBertHead(nn.Module):
    """DistilBERT's classifier on [CLS]: pre_classifier -> ReLU -> classifier (the model's own weights)."""

    def __init__(self, pre_classifier: nn.Linear, classifier: nn.Linear):
        super().__init__()
        self.pre_classifier, self.classifier = pre_classifier, classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.pre_classifier(hidden[:, 0])))


class ViTHead(nn.Module):
    """ViT's final LayerNorm + classifier on the CLS token (its own weights; also the ramp shape)."""

    def __init__(self, layernorm: nn.LayerNorm, classifier: nn.Linear):
        super().__init__()
        self.layernorm, self.classifier = layernorm, classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layernorm(hidden[:, 0]))


class TokenHead(nn.Module):
    """A token classifier: one Linear over every position, [B, L, D] -> [B, L, C] (DeBERTa's own head shape)."""

    def __init__(self, classifier: nn.Linear):
        super().__init__()
        self.classifier = classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)


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


def _cut_distilbert(model: nn.Module) -> Segments:
    dim, labels = int(model.config.dim), int(model.config.num_labels)
    return Segments("distilbert", ("input_ids", "attention_mask"), TextEmbed(model.distilbert.embeddings),
                    [MaskedLayer(l) for l in model.distilbert.transformer.layer],
                    DistilBertHead(model.pre_classifier, model.classifier), {}, labels, dim,
                    embed_inputs=("input_ids",), layer_inputs=("hidden", "attention_mask"),
                    ramp_factory=lambda: DistilBertHead(nn.Linear(dim, dim), nn.Linear(dim, labels)))


def _cut_vit(model: nn.Module) -> Segments:
    dim, labels = int(model.config.hidden_size), int(model.config.num_labels)
    return Segments("vit", ("pixel_values",), ImageEmbed(model.vit.embeddings),
                    [ImageLayer(l) for l in model.vit.layers], ViTHead(model.vit.layernorm, model.classifier), {},
                    labels, dim, embed_inputs=("pixel_values",),
                    ramp_factory=lambda: ViTHead(nn.LayerNorm(dim, eps=1e-12), nn.Linear(dim, labels)))


def _cut_deberta(model: nn.Module) -> Segments:
    encoder = model.deberta.encoder
    dim, labels = int(model.config.hidden_size), int(model.config.num_labels)
    state = ("extended_mask", "relative_pos", "rel_embeddings")
    return Segments("deberta-v2", ("input_ids", "attention_mask"), DebertaEmbed(model.deberta.embeddings, encoder),
                    [DebertaLayer(l) for l in encoder.layer], TokenHead(model.classifier), {}, labels, dim,
                    ramp_factory=lambda: TokenHead(nn.Linear(dim, labels)),
                    embed_inputs=("input_ids", "attention_mask"), state=state, layer_inputs=("hidden", *state),
                    shared=("relative_pos", "rel_embeddings"), token_level=True,
                    axes={"extended_mask": {0: "batch", 2: "sequence", 3: "sequence"},
                          "relative_pos": {1: "sequence", 2: "sequence"}, "rel_embeddings": {}})


# One cut per HF model_type (what differs between families lives here and nowhere else).
CUTS = {"distilbert": _cut_distilbert, "vit": _cut_vit, "deberta-v2": _cut_deberta}
SUPPORTED = tuple(CUTS)

_DEFAULT_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                 "pixel_values": {0: "batch"}}


def segment_model(model: nn.Module, model_type: str, exit_layers: list[int] | None = None,
                  seed: int = 0) -> Segments:
    """Cut an HF model (a deep copy; eager attention) into segments with fresh ramps after `exit_layers`."""
    from dyngate_build.export import example_inputs
    from dyngate_build.families import family_for

    check_model(model, model_type)
    model = copy.deepcopy(model).float().eval()
    model.config._attn_implementation = "eager"  # explicit additive mask; exports to ONNX and TorchScript
    for p in model.parameters():
        p.requires_grad_(False)
    positions = resolve_exit_layers(exit_layers, num_layers(model))
    segments = CUTS[model_type](model)
    family = family_for(model_type)
    segments.example = dict(zip(family.onnx_inputs, example_inputs(model, family)))
    sequence_axis = {1: "sequence"} if segments.uses_mask else {}
    segments.axes = {**_DEFAULT_AXES, "hidden": {0: "batch", **sequence_axis}, **segments.axes}
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


# ---------------------------------------------------------------------------------------------- training

def token_labels(encoding, spans, labels: list[str]) -> list[int]:
    """Per-token ramp labels of one sentence from its gold entity spans `(type, start_char, end_char)`.

    Every real token is labelled, since the exit rule looks at every real token: a token starting an entity
    takes B-X, a later token inside it I-X (a word's continuation sub-tokens included), tokens outside
    entities and special tokens ([CLS], [SEP]) "O". `encoding` is a `tokenizers.Encoding` (char offsets).
    """
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for position, word_id in enumerate(encoding.word_ids):
        tag = "O"
        if word_id is not None:
            start = encoding.offsets[position][0]
            for kind, span_start, span_end in spans:
                if span_start <= start < span_end:
                    tag = f"{'B' if start == span_start else 'I'}-{kind}"
                    break
        if tag not in index:
            raise ConfigError(f"gold tag {tag!r} is not among the model's labels {labels}; the data and the "
                              f"checkpoint's id2label disagree")
        out.append(index[tag])
    return out


class RampTrainer(nn.Module):
    """The ramps as one trainable module: loss = mean cross-entropy of every ramp on cached hidden states.

    Batches hold `h<k>` (the ramp input after layer k: the [CLS]/CLS position only, [B, 1, D], or every
    position for token tasks, [B, L, D]) and `labels` ([B], or [B, L] with IGNORE at padding).
    """

    def __init__(self, ramps: dict[int, nn.Module], token_level: bool = False):
        super().__init__()
        self.positions = sorted(ramps)
        self.ramps = nn.ModuleList([ramps[p] for p in self.positions])
        self.token_level = token_level

    def forward(self, labels: torch.Tensor, **hidden) -> torch.Tensor:
        losses = []
        for p, ramp in zip(self.positions, self.ramps):
            logits = ramp(hidden[f"h{p}"]).float()
            losses.append(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                      ignore_index=IGNORE))
        return torch.stack(losses).mean()


def exit_weights(positions: list[int], scheme: str) -> dict[int, float]:
    """Loss weight of each exit (1-based layer numbers, the last being the head), normalised to sum 1.

    "depth": w_k proportional to k (deeper exits weigh more; Kaya et al. 2019, Zhou et al. 2020);
    "uniform": all equal.
    """
    if scheme not in JOINT_WEIGHTS:
        raise ConfigError(f"joint_weights={scheme!r} is not supported; choose one of: {', '.join(JOINT_WEIGHTS)}")
    raw = {k: float(k) if scheme == "depth" else 1.0 for k in sorted(positions)}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


class JointTrainer(nn.Module):
    """Backbone, head and ramps as one trainable module: loss = sum_k w_k CE_k over every exit.

    Batches hold the graph inputs and `labels` ([B], or [B, L] with IGNORE at padding); `weights` maps exit
    layer -> weight, the last layer's exit being the model's own head.
    """

    def __init__(self, segments: Segments, weights: dict[int, float]):
        super().__init__()
        self.embed, self.layers, self.head = segments.embed, nn.ModuleList(segments.layers), segments.head
        self.ramps = nn.ModuleDict({str(p): ramp for p, ramp in segments.ramps.items()})
        self.segments, self.weights = segments, dict(weights)

    def forward(self, labels: torch.Tensor, **inputs) -> torch.Tensor:
        env = self.segments.start(inputs)
        last = len(self.layers)
        loss = torch.zeros((), device=labels.device)
        for i in range(last):
            env["hidden"] = self.segments.run_layer(i, env)
            layer = i + 1
            if layer != last and str(layer) not in self.ramps:
                continue
            logits = (self.head if layer == last else self.ramps[str(layer)])(env["hidden"]).float()
            loss = loss + self.weights[layer] * nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        return loss


def _targets(segments: Segments, inputs: dict, labels: list) -> torch.Tensor:
    """Training targets of one batch: [B] class ids, or [B, L] per-token ids with IGNORE at padding."""
    if not segments.token_level:
        return torch.tensor(labels, dtype=torch.long)
    target = torch.full(inputs["attention_mask"].shape, IGNORE, dtype=torch.long)
    for row, ids in enumerate(labels):
        target[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    target[inputs["attention_mask"] == 0] = IGNORE
    return target


def train_ramps(segments: Segments, feeds: list[dict], labels: list, training_config, training: str = "frozen",
                joint_weights: str = "depth", backbone_learning_rate: float | None = None) -> dict:
    """Train the ramps on `feeds` (graph-input batches) with labels through dyngate_build.training.

    labels: one class id per example, or for token tasks one list of per-token ids per example (as long as
    its tokens; see `token_labels`).
    training="frozen": the backbone runs once, the ramp inputs are cached, DeepSpeed trains only the ramps
    (loss: mean CE of the ramps). training="joint": embeddings, layers, head and ramps train together on the
    graph inputs (loss: sum_k w_k CE_k over the ramps and the head, `exit_weights(..., joint_weights)`); the
    ramps at `training_config.learning_rate`, the backbone and head at `backbone_learning_rate` (None = the
    same). The segments are changed in place and left in eval mode, the backbone's requires_grad off again.
    Returns {"steps", "final_loss", "seconds", "backbone"} (+ "weights" when joint, "tokens" for token tasks).
    """
    from dyngate_build.training import train

    check_choice("training", training, TRAINING_MODES)
    batches: list[dict] = []
    offset = tokens = 0
    for feed in feeds:
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
        size = next(iter(inputs.values())).shape[0]
        target = _targets(segments, inputs, labels[offset:offset + size])
        if segments.token_level:
            tokens += int((target != IGNORE).sum())
        if training == "joint":
            batch = {name: inputs[name] for name in segments.inputs}
        else:
            states = segments.hidden_states(inputs)
            batch = {f"h{p}": (states[p - 1] if segments.token_level else states[p - 1][:, :1]).clone()
                     for p in segments.ramps}
        batch["labels"] = target
        offset += size
        batches.append(batch)
    if offset != len(labels):
        raise ConfigError(f"{len(labels)} labels for {offset} training inputs; they must match")
    report: dict = {"backbone": training}
    if training == "joint":
        weights = exit_weights([*segments.ramps, len(segments.layers)], joint_weights)
        trainer: nn.Module = JointTrainer(segments, weights)
        ramp_ids = {id(p) for ramp in segments.ramps.values() for p in ramp.parameters()}
        for p in trainer.parameters():
            p.requires_grad_(True)
        backbone = [p for p in trainer.parameters() if id(p) not in ramp_ids]
        ramps = [p for ramp in segments.ramps.values() for p in ramp.parameters()]
        groups = [{"params": ramps},
                  {"params": backbone, **({"lr": backbone_learning_rate} if backbone_learning_rate else {})}]
        report.update(weights={str(k): round(v, 4) for k, v in weights.items()}, joint_weights=joint_weights,
                      backbone_learning_rate=backbone_learning_rate or training_config.learning_rate)
        desc = "early-exit joint"
    else:
        trainer, groups, desc = RampTrainer(segments.ramps, segments.token_level), None, "early-exit ramps"
    try:
        result = train(trainer, batches, training_config, loss_fn=lambda model, batch: model(**batch), desc=desc,
                       param_groups=groups)
    finally:
        for p in (backbone if training == "joint" else ()):
            p.requires_grad_(False)  # frozen again, as segment_model left it
    segments.eval()
    report.update(steps=result.steps, final_loss=round(result.final_loss, 4), seconds=round(result.seconds, 1))
    if segments.token_level:
        report["tokens"] = tokens
    return report


# ---------------------------------------------------------------------------------------------- ONNX export

def _export(module: nn.Module, args: tuple, names: list[str], shapes: dict, path: Path,
            outputs: list[str] | None = None) -> None:
    from dyngate_build.export import ONNX_OPSET, _quiet

    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=ONNX_OPSET, input_names=names,
                                        output_names=outputs or ["output"], dynamic_shapes=shapes, optimize=True)
            program.save(str(path), external_data=False)
    except Exception as e:
        raise ExportError(f"ONNX export of early-exit segment {path.name} failed: {type(e).__name__}: {e}") from e


def _dims(segments: Segments, names) -> dict:
    """torch.export dynamic shapes of `names` from `segments.axes` (one Dim object per axis name)."""
    dims = {"batch": torch.export.Dim("batch", min=1, max=1024),
            "sequence": torch.export.Dim("sequence", min=1, max=4096)}
    return {name: ({axis: dims[kind] for axis, kind in segments.axes[name].items()} or None) for name in names}


def export_onnx_segments(segments: Segments, folder: Path, criterion: str, default_threshold: float,
                         task: str) -> Path:
    """Write one ONNX graph per segment into `folder` plus `early_exit.json` (what the engine chains).

    embeddings: graph inputs `embed_inputs` -> ("hidden", *state); layer_<i>: `layer_inputs` -> hidden;
    ramp_<k>, head: hidden -> logits. The manifest names the state and the shared (unbatched) tensors.
    `task` must agree with the segments (token-classification <-> per-token ramps).
    """
    if (task == "token-classification") != segments.token_level:
        raise ExportError(f"task {task!r} does not match the {segments.model_type} segments "
                          f"({'per-token' if segments.token_level else 'per-sequence'} ramps)")
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        env = segments.start(segments.example)
    embed_in = list(segments.embed_inputs)
    _export(segments.embed, tuple(env[n] for n in embed_in), embed_in, _dims(segments, embed_in),
            folder / "embeddings.onnx", outputs=["hidden", *segments.state])
    files: dict[str, str] = {"embeddings": "embeddings.onnx"}
    layer_in = list(segments.layer_inputs)
    for i, layer in enumerate(segments.layers, start=1):
        _export(layer, tuple(env[n] for n in layer_in), layer_in, _dims(segments, layer_in), folder / f"layer_{i}.onnx")
        files[f"layer_{i}"] = f"layer_{i}.onnx"
    hidden = (env["hidden"],)
    for position, ramp in segments.ramps.items():
        _export(ramp, hidden, ["hidden"], _dims(segments, ["hidden"]), folder / f"ramp_{position}.onnx")
        files[f"ramp_{position}"] = f"ramp_{position}.onnx"
    _export(segments.head, hidden, ["hidden"], _dims(segments, ["hidden"]), folder / "head.onnx")
    files["head"] = "head.onnx"
    manifest = {"inputs": list(segments.inputs), "layers": len(segments.layers),
                "exit_layers": sorted(segments.ramps), "criterion": criterion,
                "default_threshold": default_threshold, "level": "token" if segments.token_level else "sequence",
                "num_labels": segments.num_labels, "state": list(segments.state),
                "shared": list(segments.shared), "segments": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------- TorchScript

class NoRamp(nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0, :0]


class EmbedStep(nn.Module):
    """Scripted around the traced embeddings: (first input, attention mask) -> (hidden, state list).

    with_mask: the layers take the 2-D attention mask as their state (DistilBERT); else no state (ViT).
    """

    def __init__(self, traced: nn.Module, with_mask: bool):
        super().__init__()
        self.traced = traced
        self.with_mask = with_mask

    def forward(self, first: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        hidden = self.traced(first)
        if self.with_mask:
            return hidden, [mask]
        return hidden, []


class DebertaEmbedStep(EmbedStep):
    """The traced DeBERTa embeddings return four tensors; TorchScript needs the tuple's arity statically."""

    def forward(self, first: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        hidden, extended_mask, relative_pos, rel_embeddings = self.traced(first, mask)
        return hidden, [extended_mask, relative_pos, rel_embeddings]


class Step(nn.Module):
    """One layer and its (optional) ramp, as scripted code around traced graphs; layer(hidden, *state)."""

    def __init__(self, layer: nn.Module, ramp: nn.Module, has_ramp: bool):
        super().__init__()
        self.layer, self.ramp = layer, ramp
        self.has_ramp = has_ramp

    def forward(self, hidden: torch.Tensor, state: List[torch.Tensor]) -> torch.Tensor:
        return self.layer(hidden, state[0])


class ImageStep(Step):
    def forward(self, hidden: torch.Tensor, state: List[torch.Tensor]) -> torch.Tensor:
        return self.layer(hidden)


class DebertaStep(Step):
    def forward(self, hidden: torch.Tensor, state: List[torch.Tensor]) -> torch.Tensor:
        return self.layer(hidden, state[0], state[1], state[2])


class ScriptedEarlyExit(nn.Module):
    """forward(*graph inputs, threshold) -> (logits, exit_layer); samples that exit leave the batch.

    batched[j] says whether state[j] has a batch axis (sliced when rows exit) or is shared by all rows.
    token_level: logits [B, L, C] and a sentence exits when its least confident real token is confident.
    """

    def __init__(self, embed: EmbedStep, steps: List[Step], head: nn.Module, entropy: bool, num_labels: int,
                 uses_mask: bool, batched: List[bool], token_level: bool):
        super().__init__()
        self.embed, self.steps, self.head = embed, nn.ModuleList(steps), head
        self.entropy, self.num_labels, self.layers, self.uses_mask = entropy, num_labels, len(steps), uses_mask
        self.batched = torch.jit.Attribute(list(batched), List[bool])  # typed even when empty (ViT)
        self.token_level = token_level

    def _confidence(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        if not self.entropy:
            conf = probs.max(dim=-1).values
        else:
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
            conf = 1.0 - entropy / torch.log(torch.tensor(float(logits.shape[-1])))
        if self.token_level:
            conf = torch.where(mask != 0, conf, torch.full_like(conf, float("inf"))).amin(dim=1)
        return conf

    def run(self, first: torch.Tensor, mask: torch.Tensor,
            threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden, state = self.embed(first, mask)
        batch = first.shape[0]
        if self.token_level:
            out = torch.zeros([batch, hidden.shape[1], self.num_labels], dtype=torch.float32, device=first.device)
        else:
            out = torch.zeros([batch, self.num_labels], dtype=torch.float32, device=first.device)
        exit_layer = torch.full([batch], self.layers, dtype=torch.long, device=first.device)
        active = torch.arange(batch, device=first.device)
        may_exit = bool(threshold.reshape(-1)[0] < 1.0)
        number = 0
        for step in self.steps:
            number += 1
            hidden = step(hidden, state)
            if step.has_ramp and may_exit:
                logits = step.ramp(hidden)
                done = self._confidence(logits, mask) >= threshold.reshape(-1)[0]
                if bool(done.any()):
                    rows = active[done]
                    out[rows] = logits[done].float()
                    exit_layer[rows] = number
                    keep = torch.logical_not(done)
                    active = active[keep]
                    hidden = hidden[keep]
                    if self.uses_mask:
                        mask = mask[keep]
                    kept: List[torch.Tensor] = []
                    for j in range(len(state)):
                        kept.append(state[j][keep] if self.batched[j] else state[j])
                    state = kept
                    if active.numel() == 0:
                        return out, exit_layer
        out[active] = self.head(hidden).float()
        return out, exit_layer


class ScriptedTextEarlyExit(ScriptedEarlyExit):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.run(input_ids, attention_mask, threshold)


class ScriptedImageEarlyExit(ScriptedEarlyExit):
    def forward(self, pixel_values: torch.Tensor, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.run(pixel_values, torch.zeros(0), threshold)


# How each layer_inputs signature is scripted: (embeddings step class, step class). A new signature needs a
# pair here; everything else in the scripted loop is shared.
_SCRIPTED = {
    ("hidden",): (EmbedStep, ImageStep),
    ("hidden", "attention_mask"): (EmbedStep, Step),
    ("hidden", "extended_mask", "relative_pos", "rel_embeddings"): (DebertaEmbedStep, DebertaStep),
}


def export_torchscript(segments: Segments, path: Path, criterion: str) -> Path:
    """Trace each segment, script the exit loop around them, save to `path`."""
    from dyngate_build.export import _quiet

    if tuple(segments.layer_inputs) not in _SCRIPTED:
        raise ExportError(f"TorchScript early exit has no scripted step for layer inputs {segments.layer_inputs}; "
                          f"add one to build/dyngate_build/early_exit.py _SCRIPTED or serve the ONNX early-exit variant")
    embed_class, step_class = _SCRIPTED[tuple(segments.layer_inputs)]
    example = segments.example
    try:
        with _quiet(), torch.no_grad():
            embed_args = tuple(example[n] for n in segments.embed_inputs)
            traced_embed = torch.jit.trace(segments.embed, embed_args, check_trace=False)
            embed = embed_class(traced_embed, "attention_mask" in segments.layer_inputs)
            env = segments.start(example)
            hidden = env["hidden"]
            layer_args = tuple(env[n] for n in segments.layer_inputs)
            steps = []
            for i, layer in enumerate(segments.layers, start=1):
                traced = torch.jit.trace(layer, layer_args, check_trace=False)
                ramp = segments.ramps.get(i)
                traced_ramp = torch.jit.trace(ramp, (hidden,), check_trace=False) if ramp is not None else NoRamp()
                steps.append(step_class(traced, traced_ramp, ramp is not None))
            head = torch.jit.trace(segments.head, (hidden,), check_trace=False)
            cls = ScriptedTextEarlyExit if segments.uses_mask else ScriptedImageEarlyExit
            batched = [name not in segments.shared for name in segments.layer_inputs[1:]]
            module = cls(embed, steps, head, criterion == "entropy", segments.num_labels, segments.uses_mask,
                         batched, segments.token_level)
            scripted = torch.jit.script(module.eval())
            scripted.save(str(path))
    except Exception as e:
        raise ExportError(f"TorchScript export of the early-exit model failed: {type(e).__name__}: {e}") from e
    return path


# ---------------------------------------------------------------------------------------------- curve

def default_threshold(curve: list[dict], full_value: float, max_drop: float = 0.01, metric: str = "accuracy") -> float:
    """Lowest threshold whose `metric` is within `max_drop` of the full model's (1.0 when none is)."""
    ok = [row["threshold"] for row in curve if row[metric] >= full_value - max_drop - 1e-12]
    return min(ok) if ok else 1.0
