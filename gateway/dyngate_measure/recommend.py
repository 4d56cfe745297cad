"""The recommended variant: the fastest one measured on this machine whose dev metric is within a budget of FP32.

This is what Intel Neural Compressor users ask for ("the fastest model that meets tolerable_loss"); Model
Navigator and Model Analyzer rank by speed alone. One function, `recommend`, answers it for `dyngate report`
(Triton gRPC p50 at batch 1), `dyngate recommend` (the build's in-process p50 from metadata.json) and the
gateway's Compare tab (the p50 it has just measured); each brings its own latencies as `Candidate`s.

    rec = recommend([Candidate("fp32", 0.902, 5.1), Candidate("int8-dynamic", 0.897, 2.0),
                     Candidate("early-exit", 0.861, 1.2)], baseline="fp32", budget_pt=1.0)
    rec.chosen      # "int8-dynamic"
    print(rec.explain())
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dyngate_build.errors import ConfigError

BASELINE_VARIANT = "fp32"
_EPS = 1e-9


@dataclass(frozen=True)
class Candidate:
    """One variant as the recommendation sees it.

    metric: the dev metric (accuracy or entity F1) as a fraction in [0, 1]; None when not measured.
    p50_ms: median latency in ms (batch 1); None when not measured. size_mb: artifact size, breaks p50 ties.
    unusable: why it cannot be recommended whatever its numbers (e.g. measured on another machine), else None.
    """

    variant: str
    metric: float | None
    p50_ms: float | None
    size_mb: float | None = None
    unusable: str | None = None


@dataclass
class Recommendation:
    """The choice and why. chosen: the variant (None when none qualifies); rejected: (variant, reason) for each
    variant faster than the chosen one (every other one when none was chosen)."""

    chosen: str | None
    baseline: str
    baseline_metric: float
    budget_pt: float
    metric_name: str
    latency: str
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def candidate(self, variant: str) -> Candidate:
        return next(c for c in self.candidates if c.variant == variant)

    def delta_pt(self, variant: str) -> float | None:
        """The variant's metric minus the baseline's, in points (percentage points for accuracy)."""
        metric = self.candidate(variant).metric
        return None if metric is None else (metric - self.baseline_metric) * 100.0

    def explain(self) -> str:
        """A few lines for people: the choice with its metric, Δ and p50, then the faster variants rejected."""
        rule = (f"within {self.budget_pt:g} pt of {self.baseline}'s {self.metric_name} {self.baseline_metric:.4f} "
                f"(latency: {self.latency})")
        if self.chosen is None:
            lines = [f"no variant qualifies: none is {rule}"]
        else:
            c = self.candidate(self.chosen)
            lines = [f"recommended: {self.chosen} — {self.metric_name} {c.metric:.4f} "
                     f"({self.delta_pt(self.chosen):+.2f} pt), p50 {c.p50_ms:.3f} ms"
                     + (f", {c.size_mb:.2f} MB" if c.size_mb is not None else ""),
                     f"  the fastest variant {rule}"]
        if self.rejected:
            lines.append("  rejected" + (" although faster:" if self.chosen else ":"))
            lines += [f"    {variant}: {reason}" for variant, reason in self.rejected]
        elif self.chosen is not None:
            lines.append("  no variant is faster")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {**asdict(self), "explanation": self.explain()}


def recommend(candidates: list[Candidate], baseline: str = BASELINE_VARIANT, budget_pt: float = 1.0,
              metric_name: str = "accuracy", latency: str = "p50 batch 1") -> Recommendation:
    """The fastest candidate (lowest p50_ms; then smaller size, then name) whose metric is at most `budget_pt`
    points below the baseline's, among those with a metric and a p50 and not `unusable`.

    candidates: one per variant, the baseline among them. baseline: its variant name ("fp32"; the first
    candidate when no candidate has that name). budget_pt: points (0.01 of the metric's [0, 1] scale) the
    choice may lose, ≥ 0. metric_name, latency: words for the explanation.
    Raises ConfigError for a negative budget, no candidates, or a baseline without a metric.
    """
    if budget_pt is None or not math.isfinite(budget_pt) or budget_pt < 0:
        raise ConfigError(f"budget={budget_pt!r} must be a number ≥ 0: the points of {metric_name} the recommended variant "
                          "may lose against FP32, e.g. 1.0")
    if not candidates:
        raise ConfigError("no variants to recommend from; build some with dyngate build")
    names = [c.variant for c in candidates]
    if baseline not in names:
        baseline = names[0]
    base = candidates[names.index(baseline)]
    if base.metric is None:
        raise ConfigError(f"the baseline {baseline} has no dev {metric_name}; rebuild it with dyngate build")

    def why_not(c: Candidate) -> str | None:
        if c.unusable:
            return c.unusable
        if c.metric is None:
            return f"no dev {metric_name} measured"
        if c.p50_ms is None:
            return "no latency measured"
        delta = (c.metric - base.metric) * 100.0
        if delta < -budget_pt - _EPS:
            return (f"{metric_name} {c.metric:.4f} is {-delta:.2f} pt below {baseline} (budget {budget_pt:g} pt)"
                    f", p50 {c.p50_ms:.3f} ms")
        return None

    reasons = {c.variant: why_not(c) for c in candidates}
    eligible = [c for c in candidates if reasons[c.variant] is None]
    chosen = min(eligible, key=lambda c: (c.p50_ms, c.size_mb if c.size_mb is not None else float("inf"),
                                          c.variant)) if eligible else None
    if chosen is None:
        rejected = [(c.variant, reasons[c.variant]) for c in candidates]
    else:
        faster = sorted((c for c in candidates if c.variant != chosen.variant and c.p50_ms is not None
                         and c.p50_ms < chosen.p50_ms), key=lambda c: c.p50_ms)
        rejected = [(c.variant, reasons[c.variant] or "slower") for c in faster]
    return Recommendation(chosen=chosen.variant if chosen else None, baseline=baseline,
                          baseline_metric=float(base.metric), budget_pt=float(budget_pt), metric_name=metric_name,
                          latency=latency, candidates=list(candidates), rejected=rejected)


# --------------------------------------------------------------------------------------- from the build

def this_machine() -> dict:
    """{"cpu", "cores"} of this machine, as the build records it in metadata.json ("machine")."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def sample_size_mismatch(n: int | None, reference_n: int | None, reference: str = BASELINE_VARIANT,
                         metric_name: str = "accuracy") -> str | None:
    """Why a dev metric measured on `n` examples cannot be set beside the reference's, measured on
    `reference_n`; None when the counts are equal (or either is unknown).

    Two builds with another `--eval-limit` score different dev examples, so the Δ in points between them says
    nothing (found in a trial: an early-exit variant scored on 200 examples read +1.08 pt beside fp32 on 872
    while it was −0.50 pt against its own FP32 reference). The one rule for `build_candidates`, the gateway's
    policies and the Compare tab and report's recommendations."""
    if n is None or reference_n is None or int(n) == int(reference_n):
        return None
    return (f"{metric_name} measured on {n} dev examples, {reference}'s on {reference_n}: not comparable; "
            f"rebuild both with the same --eval-limit")


def reference_metadata(entries: list, baseline: str = BASELINE_VARIANT):
    """The metadata (VariantMetadata or None) a model's variants are compared with: the `baseline` entry's,
    else the first entry's (as `recommend` picks its baseline). entries: objects with .variant, .metadata."""
    entry = next((e for e in entries if e.variant == baseline), entries[0] if entries else None)
    return None if entry is None else entry.metadata


def build_candidates(entries: list, machine: dict | None = None, baseline: str = BASELINE_VARIANT) -> list[Candidate]:
    """Candidates from the build's own numbers in each entry's metadata.json (VariantMetadata): dev metric,
    in-process p50 at batch 1, size. Unusable (the reason is shown by `Recommendation.explain`):
    a variant whose numbers were measured on another machine (its recorded cpu/cores differ from `machine`,
    default: this one): its p50 says nothing about this machine; one whose dev metric was measured on another
    number of examples than the `baseline` variant's (`sample_size_mismatch`); one without metadata (no
    numbers)."""
    machine = machine or this_machine()
    reference = reference_metadata(entries, baseline)
    candidates = []
    for entry in entries:
        meta = entry.metadata
        if meta is None:
            candidates.append(Candidate(entry.variant, None, None, unusable="no metadata.json: rebuild it"))
            continue
        unusable = None
        if meta.machine is not None and (meta.machine.cpu, meta.machine.cores) != (machine["cpu"], machine["cores"]):
            unusable = f"measured on another machine ({meta.machine.cpu}, {meta.machine.cores} cores); rebuild it here"
        elif reference is not None:
            unusable = sample_size_mismatch(meta.accuracy.n, reference.accuracy.n, reference.variant,
                                            meta.accuracy.name)
        candidates.append(Candidate(variant=entry.variant, metric=meta.accuracy.value,
                                    p50_ms=meta.latency_in_process.p50_ms, size_mb=meta.size_mb, unusable=unusable))
    return candidates


def metric_name(entries: list) -> str:
    """The dev metric's name of a model's variants ("accuracy", "entity_f1")."""
    return next((e.metadata.accuracy.name for e in entries if e.metadata is not None), "accuracy")


def recommend_from_repository(repository: Path, model: str, budget_pt: float) -> Recommendation:
    """`recommend` over `model`'s python-backend variants in `repository`, with the build's numbers
    (`build_candidates`). ConfigError naming the models there when `model` is not built."""
    from dyngate_build.repository import python_variants_by_model

    entries = python_variants_by_model(Path(repository), [model])[model]
    return recommend(build_candidates(entries), BASELINE_VARIANT, budget_pt, metric_name(entries),
                     latency="in-process p50 at batch 1, measured by the build on this machine")
