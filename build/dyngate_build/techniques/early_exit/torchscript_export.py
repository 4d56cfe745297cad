"""TorchScript export of early exit: `torch.jit.script` of `ScriptedEarlyExit`, a loop over traced segments with
per-sample exit; forward(*graph inputs, threshold) -> (logits, exit_layer)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn

from dyngate_build.errors import ExportError
from dyngate_build.export import quiet_exporters
from dyngate_build.techniques.early_exit.segments import Segments


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
    if tuple(segments.layer_inputs) not in _SCRIPTED:
        raise ExportError(f"TorchScript early exit has no scripted step for layer inputs {segments.layer_inputs}; "
                          f"add one to _SCRIPTED in build/dyngate_build/techniques/early_exit/torchscript_export.py "
                          f"or serve the ONNX early-exit variant")
    embed_class, step_class = _SCRIPTED[tuple(segments.layer_inputs)]
    example = segments.example
    try:
        with quiet_exporters(), torch.no_grad():
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
