"""Pruning: structured (attention heads and FFN neurons removed, smaller shapes) and unstructured (sparse).

Structured pruning of HF models in transformers 5 (which removed `prune_heads`): the query/key/value
projections lose the output rows of a pruned head and the attention output projection loses the matching
input columns, all with `transformers.pytorch_utils.prune_linear_layer`; the attention module's head count
(and all-head size) are updated, and `model.config.pruned_heads` records {layer: [heads removed]}.

Importance scores (documented, data-free, deterministic):
- head h of a layer: the L1 norm of its weights — its rows in W_q, W_k, W_v and its columns in W_o
  (magnitude criterion; Michel et al. 2019 use gradient-based importance, which the recovery KD makes up
  for here). The lowest-scoring `round(ratio * heads)` heads of every layer go, at least one head stays.
- FFN neuron j: L1 of its row in the first FFN linear plus its column in the second; the lowest
  `round(ratio * width)` of every layer go.

Unstructured pruning (`sparsify`): global magnitude pruning over every Linear weight of the encoder and head
(`torch.nn.utils.prune.global_unstructured`, L1), made permanent; shapes stay, zeros are stored.
"""

from __future__ import annotations

import gzip
import io

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from dyngate_build.errors import ConfigError
from dyngate_build.families import LayerParts, family_for, registered_families


def pruning_families() -> list[str]:
    """The registered model types structured pruning supports (FamilySpec.pruning_layers set)."""
    return [t for t, spec in registered_families().items() if spec.pruning_layers is not None]


def check_family(model_type: str) -> None:
    """ConfigError unless `model_type` is a registered family with structured-pruning parts."""
    supported = pruning_families()
    if model_type not in supported:
        note = family_for(model_type).pruning_note if model_type in registered_families() else ""
        raise ConfigError(f"structured pruning supports model types {', '.join(supported)}; {model_type!r} is not "
                          f"supported yet" + (f" ({note})" if note else "") +
                          " (FamilySpec.pruning_layers in build/dyngate_build/families/)")


def check_ratio(field: str, ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"{field}={ratio!r} is outside [0, 1): 1.0 would remove every head/neuron; "
                          f"use e.g. 0.4 to remove 40%")
    return float(ratio)


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)


def layers_of(model: nn.Module, model_type: str) -> tuple[list[nn.Module], LayerParts]:
    check_family(model_type)
    path, parts = family_for(model_type).pruning_layers
    return list(_get(model, path)), parts


def head_scores(layer: nn.Module, parts: LayerParts) -> torch.Tensor:
    """L1 importance per head of one layer (see module docstring)."""
    attention = _get(layer, parts.attention)
    heads, size = getattr(attention, parts.heads_attr), getattr(attention, parts.head_size_attr)
    score = torch.zeros(heads)
    for name in (parts.query, parts.key, parts.value):
        score += _get(layer, name).weight.detach().abs().reshape(heads, size, -1).sum(dim=(1, 2))
    score += _get(layer, parts.out).weight.detach().abs().reshape(-1, heads, size).sum(dim=(0, 2))
    return score


def neuron_scores(layer: nn.Module, parts: LayerParts) -> torch.Tensor:
    return (_get(layer, parts.ffn_in).weight.detach().abs().sum(dim=1)
            + _get(layer, parts.ffn_out).weight.detach().abs().sum(dim=0))


def prune_heads(layer: nn.Module, parts: LayerParts, heads_to_remove: list[int]) -> None:
    """Remove `heads_to_remove` (indices into the layer's current heads) by shrinking q/k/v/out."""
    if not heads_to_remove:
        return
    attention = _get(layer, parts.attention)
    heads, size = getattr(attention, parts.heads_attr), getattr(attention, parts.head_size_attr)
    remove = set(heads_to_remove)
    if len(remove) >= heads:
        raise ConfigError(f"cannot remove all {heads} heads of a layer; keep at least one")
    keep = torch.tensor([h * size + i for h in range(heads) if h not in remove for i in range(size)],
                        dtype=torch.long)
    for name in (parts.query, parts.key, parts.value):
        _set(layer, name, prune_linear_layer(_get(layer, name), keep, dim=0))
    _set(layer, parts.out, prune_linear_layer(_get(layer, parts.out), keep, dim=1))
    setattr(attention, parts.heads_attr, heads - len(remove))
    if parts.all_head_attr:
        setattr(attention, parts.all_head_attr, (heads - len(remove)) * size)
    attention.pruned_heads = getattr(attention, "pruned_heads", set()) | remove


def prune_neurons(layer: nn.Module, parts: LayerParts, keep: torch.Tensor) -> None:
    _set(layer, parts.ffn_in, prune_linear_layer(_get(layer, parts.ffn_in), keep, dim=0))
    _set(layer, parts.ffn_out, prune_linear_layer(_get(layer, parts.ffn_out), keep, dim=1))


def prune_structured(model: nn.Module, model_type: str, head_ratio: float, ffn_ratio: float) -> dict:
    """Prune `model` in place; returns {"pruned_heads": {layer: [heads]}, "heads": [...], "ffn": [...]}."""
    check_ratio("head_ratio", head_ratio)
    check_ratio("ffn_ratio", ffn_ratio)
    layers, parts = layers_of(model, model_type)
    pruned: dict[int, list[int]] = {}
    heads_left, ffn_left = [], []
    for index, layer in enumerate(layers):
        scores = head_scores(layer, parts)
        count = min(int(round(head_ratio * len(scores))), len(scores) - 1)
        remove = sorted(int(h) for h in torch.argsort(scores)[:count])
        prune_heads(layer, parts, remove)
        pruned[index] = remove
        heads_left.append(int(getattr(_get(layer, parts.attention), parts.heads_attr)))
        neurons = neuron_scores(layer, parts)
        drop = min(int(round(ffn_ratio * len(neurons))), len(neurons) - 1)
        keep = torch.sort(torch.argsort(neurons, descending=True)[:len(neurons) - drop]).values
        prune_neurons(layer, parts, keep)
        ffn_left.append(int(len(keep)))
    model.config.pruned_heads = {str(k): v for k, v in pruned.items()}
    return {"pruned_heads": pruned, "heads": heads_left, "ffn": ffn_left}


def num_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------------------- distillation

def recover_with_kd(student: nn.Module, teacher: nn.Module, feeds: list[dict], training_config,
            temperature: float = 2.0, token_level: bool = False) -> dict:
    """Recovery fine-tuning of `student` towards `teacher`'s logits (KL at `temperature`) via dyngate_build.training.

    feeds: graph-input batches (numpy); the teacher's soft targets are computed once, up front.
    """
    import numpy as np

    from dyngate_build.training import train

    teacher.eval()
    batches = []
    with torch.no_grad():
        for feed in feeds:
            inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
            batches.append({**inputs, "teacher_logits": teacher(**inputs).logits.float()})

    def loss_fn(model, batch):
        teacher_logits = batch.pop("teacher_logits")
        logits = model(**batch).logits.float()
        t = temperature
        if token_level and "attention_mask" in batch:
            keep = batch["attention_mask"].bool()
            logits, teacher_logits = logits[keep], teacher_logits[keep]
        return nn.functional.kl_div(nn.functional.log_softmax(logits / t, dim=-1),
                                    nn.functional.softmax(teacher_logits.float() / t, dim=-1),
                                    reduction="batchmean") * t * t

    def epoch():
        return [dict(b) for b in batches]

    class Epochs:
        def __len__(self):
            return len(batches)

        def __call__(self):
            return epoch()

    result = train(student, Epochs(), training_config, loss_fn=loss_fn, desc="pruning recovery (KD)")
    student.eval()
    return {"steps": result.steps, "first_loss": round(result.losses[0], 6), "final_loss": round(result.final_loss, 6),
            "seconds": round(result.seconds, 1)}


# ---------------------------------------------------------------------------------------------- unstructured

def prunable_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every Linear weight (encoder and classifier; embeddings excluded)."""
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]


def sparsify(model: nn.Module, sparsity: float) -> dict:
    """Global L1 magnitude pruning of Linear weights to `sparsity`, made permanent; returns measured sparsity."""
    import torch.nn.utils.prune as prune

    check_ratio("sparsity", sparsity)
    targets = prunable_linears(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=float(sparsity))
    for module, name in targets:
        prune.remove(module, name)
    total = sum(m.weight.numel() for m, _ in targets)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    all_params = num_parameters(model)
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {"linear_sparsity": round(zeros / total, 4), "model_sparsity": round(all_zeros / all_params, 4),
            "linear_weights": total}


def gzip_size(path) -> int:
    """Bytes of `path` after gzip -9 (what zeros buy on disk or on the wire)."""
    with open(path, "rb") as f:
        data = f.read()
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as g:
        g.write(data)
    return len(buffer.getvalue())
