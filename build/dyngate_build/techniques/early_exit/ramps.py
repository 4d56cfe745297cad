"""Off-ramp training for early exit, through dyngate_build.training on the DeepSpeed engine.

One label per sequence, or for token tasks one label per token (`token_labels`: every real token labelled,
padding ignored):
- "frozen" (DeeBERT's second stage, the default): the backbone runs once over the training batches, the ramp
  inputs are cached and only the ramps train; loss = mean cross-entropy of the ramps. The full model (never
  exit) stays the source model.
- "joint" (Kaya et al. 2019 shallow-deep networks; Zhou et al. 2020 PABEE): embeddings, layers, the model's own
  head and the ramps train together on loss = sum_k w_k CE_k over every exit k (the ramps and the head after
  the last layer), w_k proportional to k ("depth") or equal ("uniform"), normalised to sum 1. The backbone
  and head take their own (smaller) learning rate. The full model changes: it is a different model from the
  source, and what "never exit" answers is this jointly trained full model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dyngate_build.errors import ConfigError, check_choice
from dyngate_build.techniques.early_exit.segments import Segments

IGNORE = -100  # token label ignored by the ramp loss (padding)
TRAINING_MODES = ("frozen", "joint")
JOINT_WEIGHTS = ("depth", "uniform")


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
