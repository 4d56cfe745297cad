"""Early exit's thresholds: the allowed range, the default-threshold rule and the curve measured per threshold."""

from __future__ import annotations

import numpy as np

from dyngate_build.errors import ConfigError, check_range

NEVER_EXIT = {"exit_threshold": 1.0}


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



def default_threshold(curve: list[dict], full_value: float, max_drop: float = 0.01, metric: str = "accuracy") -> float:
    """Lowest threshold whose `metric` is within `max_drop` of the full model's (1.0 when none is)."""
    ok = [row["threshold"] for row in curve if row[metric] >= full_value - max_drop - 1e-12]
    return min(ok) if ok else 1.0


def measure_curve(predictor, examples: list, labels: list[str], grid, latency_samples: int,
                  task: str = "text-classification") -> list[dict]:
    """Per threshold: the task metric (accuracy, or entity_f1 for NER), mean layers computed, exit histogram
    and batch-1 p50 (ms) through `predictor`."""

    from dyngate_build.evaluate import latency, run_predictor, task_metric

    raws = [ex.raw for ex in examples]
    rows = []
    for threshold in sorted(set(float(t) for t in grid)):
        options = {"exit_threshold": threshold}
        predictions = run_predictor(predictor, raws, options=options)
        metric = task_metric(task, predictions, examples, labels)
        layers = np.array([p.answer["exit_layer"] for p in predictions])
        lat = latency(predictor, raws[:latency_samples], options=options)
        rows.append({"threshold": threshold, metric.name: round(metric.value, 4),
                     "mean_layers": round(float(layers.mean()), 4),
                     "exits": {int(k): int(v) for k, v in zip(*np.unique(layers, return_counts=True))},
                     "p50_ms": round(lat.p50_ms, 4)})
    return rows


def own_full_model_gap(predictor, segments, feeds: list[dict]) -> float:
    """Largest |Δlogit| between `predictor` at never-exit and the segments' full model in PyTorch on `feeds`
    (real tokens only for token tasks): the exactness check of a variant whose backbone was trained."""
    import torch

    worst = 0.0
    for feed in feeds:
        got = np.asarray(predictor.engine.run(feed, dict(NEVER_EXIT))["logits"])
        want = segments.full_logits({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}).numpy()
        if segments.token_level:
            mask = feed["attention_mask"].astype(bool)
            got, want = got[mask], want[mask]
        worst = max(worst, float(np.abs(got - want).max()))
    return worst
