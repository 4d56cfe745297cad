"""Early exit (DeeBERT, Xin et al. 2020): off-ramps after transformer layers, trained with the backbone frozen.

A model is cut into segments: `embeddings`, one `layer_<i>` per transformer layer (1-based), one `ramp_<i>`
(off-ramp classifier) after each layer listed in `exit_layers`, and `head` (the model's own classifier after
the last layer). At inference a sample leaves at the first ramp whose confidence reaches the threshold;
samples that leave drop out of the batch and the rest continue, so layers after an exit are never computed.
A threshold of 1.0 or above never exits: the answer is then the full model's (same layers, same head).

Confidence (`criterion`):
- "max_prob": the largest softmax probability;
- "entropy": 1 - H(p) / log(C) (1 = one-hot, 0 = uniform), so both criteria share the [0, 1] scale.
Token classification (DeBERTa NER; Li et al. 2021) exits a sentence when EVERY real token is confident
(minimum over the attention mask).

Families: DistilBERT (ramp on the [CLS] state: Linear-ReLU-Linear like its own head) and ViT (ramp on the
CLS token: LayerNorm-Linear like its own head). DeBERTa-v2 is refused by `check_family` before any work
starts. Its relative attention is not the obstacle: a segment wrapping one DebertaV2Layer that rebuilds the
4-D mask, `encoder.get_rel_pos(hidden)` and `encoder.get_rel_embedding()` itself equals the encoder's hidden
state exactly and exports (dynamo, dynamic batch and sequence) with |Δ| ~1e-6 in ONNX Runtime (checked on the
deberta-tiny preset). What is missing is the token-level plumbing: its embeddings take the attention mask
(the engines feed embeddings the first input only), ramps and `predict_with_exit` are per sequence, and ramp
training caches the [CLS] state with one label per example instead of per-token labels.

Exports (same segments, same decision rule as build/runtime.py's engines):
- ONNX: one graph per segment in a folder with `early_exit.json`; `runtime.EarlyExitOnnxEngine` chains them.
- TorchScript: `torch.jit.script` of `ScriptedEarlyExit`, a loop over traced segments with per-sample exit;
  forward(*graph inputs, threshold) -> (logits, exit_layer).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

from build.errors import ConfigError, ExportError, check_choice, check_range

log = logging.getLogger("dyngate.early_exit")

CRITERIA = ("max_prob", "entropy")
MANIFEST = "early_exit.json"
SUPPORTED = ("distilbert", "vit")


# ---------------------------------------------------------------------------------------------- validation

def num_layers(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "n_layers", None) or getattr(config, "num_hidden_layers"))


def check_family(model_type: str) -> None:
    if model_type not in SUPPORTED:
        raise ConfigError(f"early exit supports model types {', '.join(SUPPORTED)}; {model_type!r} is not wired "
                          f"yet (token-level ramps, per-token ramp training and a masked embeddings segment are "
                          f"missing; see build/early_exit.py); drop early-exit/stacked for it")


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


def new_ramp(model_type: str, hidden: int, num_labels: int) -> nn.Module:
    """A fresh off-ramp shaped like the family's own head."""
    if model_type == "distilbert":
        return DistilBertHead(nn.Linear(hidden, hidden), nn.Linear(hidden, num_labels))
    return ViTHead(nn.LayerNorm(hidden, eps=1e-12), nn.Linear(hidden, num_labels))


@dataclass
class Segments:
    """A model cut for early exit. layers[i] is layer i+1; ramps maps layer number -> ramp module."""

    model_type: str
    inputs: tuple[str, ...]
    embed: nn.Module
    layers: list[nn.Module]
    head: nn.Module
    ramps: dict[int, nn.Module]
    num_labels: int
    hidden_size: int

    @property
    def uses_mask(self) -> bool:
        return "attention_mask" in self.inputs

    def modules(self) -> list[nn.Module]:
        return [self.embed, *self.layers, self.head, *self.ramps.values()]

    def eval(self) -> "Segments":
        for m in self.modules():
            m.eval()
        return self

    def embed_inputs(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        first = inputs[self.inputs[0]]
        return self.embed(first), inputs.get("attention_mask") if self.uses_mask else None

    def run_layer(self, index: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        layer = self.layers[index]
        return layer(hidden, mask) if self.uses_mask else layer(hidden)

    @torch.no_grad()
    def hidden_states(self, inputs: dict) -> list[torch.Tensor]:
        """Hidden states after every layer (index i = after layer i+1), no exit."""
        hidden, mask = self.embed_inputs(inputs)
        states = []
        for i in range(len(self.layers)):
            hidden = self.run_layer(i, hidden, mask)
            states.append(hidden)
        return states

    @torch.no_grad()
    def full_logits(self, inputs: dict) -> torch.Tensor:
        return self.head(self.hidden_states(inputs)[-1])


def segment_model(model: nn.Module, model_type: str, exit_layers: list[int] | None = None,
                  seed: int = 0) -> Segments:
    """Cut an HF model (a deep copy; eager attention) into segments with fresh ramps after `exit_layers`."""
    check_family(model_type)
    model = copy.deepcopy(model).float().eval()
    model.config._attn_implementation = "eager"  # explicit additive mask; exports to ONNX and TorchScript
    for p in model.parameters():
        p.requires_grad_(False)
    layers_n = num_layers(model)
    positions = resolve_exit_layers(exit_layers, layers_n)
    num_labels = int(model.config.num_labels)
    torch.manual_seed(seed)
    if model_type == "distilbert":
        hidden = int(model.config.dim)
        segments = Segments(model_type, ("input_ids", "attention_mask"), TextEmbed(model.distilbert.embeddings),
                            [MaskedLayer(l) for l in model.distilbert.transformer.layer],
                            DistilBertHead(model.pre_classifier, model.classifier), {}, num_labels, hidden)
    else:
        hidden = int(model.config.hidden_size)
        segments = Segments(model_type, ("pixel_values",), ImageEmbed(model.vit.embeddings),
                            [ImageLayer(l) for l in model.vit.layers],
                            ViTHead(model.vit.layernorm, model.classifier), {}, num_labels, hidden)
    for position in positions:
        segments.ramps[position] = new_ramp(model_type, hidden, num_labels)
    return segments.eval()


# ---------------------------------------------------------------------------------------------- decision rule

def confidence(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-row confidence in [0, 1] (see module docstring); logits [..., C] -> [...]."""
    probs = torch.softmax(logits.float(), dim=-1)
    if criterion == "max_prob":
        return probs.max(dim=-1).values
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
    return 1.0 - entropy / float(np.log(logits.shape[-1]))


@torch.no_grad()
def predict_with_exit(segments: Segments, inputs: dict, threshold: float, criterion: str = "max_prob",
                      calls: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the engines: (logits, exit_layer) with per-sample exit; `calls` counts segments."""
    hidden, mask = segments.embed_inputs(inputs)
    batch = hidden.shape[0]
    out = torch.zeros(batch, segments.num_labels)
    exit_layer = torch.full((batch,), len(segments.layers), dtype=torch.long)
    active = torch.arange(batch)
    for i in range(len(segments.layers)):
        hidden = segments.run_layer(i, hidden, mask)
        if calls is not None:
            calls[f"layer_{i + 1}"] = calls.get(f"layer_{i + 1}", 0) + 1
        ramp = segments.ramps.get(i + 1)
        if ramp is None or threshold >= 1.0:
            continue
        logits = ramp(hidden)
        done = confidence(logits, criterion) >= threshold
        if bool(done.any()):
            out[active[done]] = logits[done]
            exit_layer[active[done]] = i + 1
            keep = ~done
            active, hidden = active[keep], hidden[keep]
            mask = mask[keep] if mask is not None else None
            if active.numel() == 0:
                return out, exit_layer
    out[active] = segments.head(hidden)
    return out, exit_layer


# ---------------------------------------------------------------------------------------------- training

class RampTrainer(nn.Module):
    """The ramps as one trainable module: loss = mean cross-entropy of every ramp on cached hidden states.

    Batches hold `h<k>` (the ramp input after layer k: the [CLS]/CLS position only, [B, 1, D]) and `labels`.
    """

    def __init__(self, ramps: dict[int, nn.Module]):
        super().__init__()
        self.positions = sorted(ramps)
        self.ramps = nn.ModuleList([ramps[p] for p in self.positions])

    def forward(self, labels: torch.Tensor, **hidden) -> torch.Tensor:
        losses = [nn.functional.cross_entropy(ramp(hidden[f"h{p}"]).float(), labels)
                  for p, ramp in zip(self.positions, self.ramps)]
        return torch.stack(losses).mean()


def train_ramps(segments: Segments, feeds: list[dict], labels: list[int], training_config) -> dict:
    """Train the ramps on `feeds` (graph-input batches) with labels, backbone frozen, through build.training.

    The frozen backbone runs once: the ramp inputs are cached, then DeepSpeed trains only the ramps.
    Returns {"steps", "final_loss", "seconds"}.
    """
    from build.training import train

    cached: list[dict] = []
    offset = 0
    for feed in feeds:
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
        states = segments.hidden_states(inputs)
        size = states[0].shape[0]
        batch = {f"h{p}": states[p - 1][:, :1].clone() for p in segments.ramps}
        batch["labels"] = torch.tensor(labels[offset:offset + size], dtype=torch.long)
        offset += size
        cached.append(batch)
    if offset != len(labels):
        raise ConfigError(f"{len(labels)} labels for {offset} training inputs; they must match")
    trainer = RampTrainer(segments.ramps)
    result = train(trainer, cached, training_config, loss_fn=lambda model, batch: model(**batch),
                   desc="early-exit ramps")
    segments.eval()
    return {"steps": result.steps, "final_loss": round(result.final_loss, 4), "seconds": round(result.seconds, 1)}


# ---------------------------------------------------------------------------------------------- ONNX export

def _example(segments: Segments, batch: int = 2, sequence: int = 8) -> dict:
    embed = segments.embed.embeddings
    if segments.uses_mask:
        vocab = embed.word_embeddings.num_embeddings
        return {"input_ids": torch.randint(5, vocab, (batch, sequence)),
                "attention_mask": torch.ones(batch, sequence, dtype=torch.long)}
    size = embed.patch_embeddings.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {"pixel_values": torch.randn(batch, embed.patch_embeddings.num_channels, size, size)}


def _export(module: nn.Module, args: tuple, names: list[str], shapes: dict, path: Path) -> None:
    from build.export import ONNX_OPSET, _quiet

    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=ONNX_OPSET, input_names=names,
                                        output_names=["output"], dynamic_shapes=shapes, optimize=True)
            program.save(str(path), external_data=False)
    except Exception as e:
        raise ExportError(f"ONNX export of early-exit segment {path.name} failed: {type(e).__name__}: {e}") from e


def export_onnx_segments(segments: Segments, folder: Path, criterion: str, default_threshold: float,
                         task: str) -> Path:
    """Write one ONNX graph per segment into `folder` plus `early_exit.json` (what the engine chains)."""
    folder.mkdir(parents=True, exist_ok=True)
    example = _example(segments)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        hidden = segments.embed(example[segments.inputs[0]])
    files: dict[str, str] = {}
    first = segments.inputs[0]
    first_shape = {0: batch, 1: torch.export.Dim("sequence", min=1, max=4096)} if segments.uses_mask else {0: batch}
    _export(segments.embed, (example[first],), [first], {first: first_shape}, folder / "embeddings.onnx")
    files["embeddings"] = "embeddings.onnx"
    seq = torch.export.Dim("sequence", min=1, max=4096) if segments.uses_mask else None
    hidden_shape = {0: batch, 1: seq} if seq is not None else {0: batch}
    for i, layer in enumerate(segments.layers, start=1):
        if segments.uses_mask:
            _export(layer, (hidden, example["attention_mask"]), ["hidden", "attention_mask"],
                    {"hidden": hidden_shape, "attention_mask": {0: batch, 1: seq}}, folder / f"layer_{i}.onnx")
        else:
            _export(layer, (hidden,), ["hidden"], {"hidden": hidden_shape}, folder / f"layer_{i}.onnx")
        files[f"layer_{i}"] = f"layer_{i}.onnx"
    for position, ramp in segments.ramps.items():
        _export(ramp, (hidden,), ["hidden"], {"hidden": hidden_shape}, folder / f"ramp_{position}.onnx")
        files[f"ramp_{position}"] = f"ramp_{position}.onnx"
    _export(segments.head, (hidden,), ["hidden"], {"hidden": hidden_shape}, folder / "head.onnx")
    files["head"] = "head.onnx"
    manifest = {"inputs": list(segments.inputs), "layers": len(segments.layers),
                "exit_layers": sorted(segments.ramps), "criterion": criterion,
                "default_threshold": default_threshold, "level": "token" if task == "token-classification"
                else "sequence", "num_labels": segments.num_labels, "segments": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------- TorchScript

class NoRamp(nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0, :0]


class Step(nn.Module):
    """One layer and its (optional) ramp, as scripted code around traced graphs."""

    def __init__(self, layer: nn.Module, ramp: nn.Module, has_ramp: bool):
        super().__init__()
        self.layer, self.ramp = layer, ramp
        self.has_ramp = has_ramp

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden, mask)


class ImageStep(Step):
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden)


class ScriptedEarlyExit(nn.Module):
    """forward(*graph inputs, threshold) -> (logits, exit_layer); samples that exit leave the batch."""

    def __init__(self, embed: nn.Module, steps: List[Step], head: nn.Module, entropy: bool, num_labels: int,
                 uses_mask: bool):
        super().__init__()
        self.embed, self.steps, self.head = embed, nn.ModuleList(steps), head
        self.entropy, self.num_labels, self.layers, self.uses_mask = entropy, num_labels, len(steps), uses_mask

    def _confidence(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        if not self.entropy:
            return probs.max(dim=-1).values
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
        return 1.0 - entropy / torch.log(torch.tensor(float(logits.shape[-1])))

    def run(self, first: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed(first)
        batch = first.shape[0]
        out = torch.zeros(batch, self.num_labels, dtype=torch.float32, device=first.device)
        exit_layer = torch.full([batch], self.layers, dtype=torch.long, device=first.device)
        active = torch.arange(batch, device=first.device)
        may_exit = bool(threshold.reshape(-1)[0] < 1.0)
        number = 0
        for step in self.steps:
            number += 1
            hidden = step(hidden, mask)
            if step.has_ramp and may_exit:
                logits = step.ramp(hidden)
                done = self._confidence(logits) >= threshold.reshape(-1)[0]
                if bool(done.any()):
                    rows = active[done]
                    out[rows] = logits[done].float()
                    exit_layer[rows] = number
                    keep = torch.logical_not(done)
                    active = active[keep]
                    hidden = hidden[keep]
                    if self.uses_mask:
                        mask = mask[keep]
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


def export_torchscript(segments: Segments, path: Path, criterion: str) -> Path:
    """Trace each segment, script the exit loop around them, save to `path`."""
    from build.export import _quiet

    example = _example(segments)
    first = example[segments.inputs[0]]
    try:
        with _quiet(), torch.no_grad():
            embed = torch.jit.trace(segments.embed, (first,), check_trace=False)
            hidden = segments.embed(first)
            steps = []
            for i, layer in enumerate(segments.layers, start=1):
                args = (hidden, example["attention_mask"]) if segments.uses_mask else (hidden,)
                traced = torch.jit.trace(layer, args, check_trace=False)
                ramp = segments.ramps.get(i)
                traced_ramp = torch.jit.trace(ramp, (hidden,), check_trace=False) if ramp is not None else NoRamp()
                step_class = Step if segments.uses_mask else ImageStep
                steps.append(step_class(traced, traced_ramp, ramp is not None))
            head = torch.jit.trace(segments.head, (hidden,), check_trace=False)
            cls = ScriptedTextEarlyExit if segments.uses_mask else ScriptedImageEarlyExit
            module = cls(embed, steps, head, criterion == "entropy", segments.num_labels, segments.uses_mask)
            scripted = torch.jit.script(module.eval())
            scripted.save(str(path))
    except Exception as e:
        raise ExportError(f"TorchScript export of the early-exit model failed: {type(e).__name__}: {e}") from e
    return path


# ---------------------------------------------------------------------------------------------- curve

def default_threshold(curve: list[dict], full_accuracy: float, max_drop: float = 0.01) -> float:
    """Lowest threshold whose accuracy is within `max_drop` of the full model's (1.0 when none is)."""
    ok = [row["threshold"] for row in curve if row["accuracy"] >= full_accuracy - max_drop - 1e-12]
    return min(ok) if ok else 1.0
