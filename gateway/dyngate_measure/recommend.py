"""The recommended variant: the fastest one measured on this machine whose dev metric is within a budget of FP32.

This is what Intel Neural Compressor users ask for ("the fastest model that meets tolerable_loss"); Model
Navigator and Model Analyzer rank by speed alone. One function, `recommend`, answers it for `dyngate report`
(Triton gRPC p50 at batch 1), `dyngate recommend` (the build's in-process p50 from metadata.json) and the
gateway's Compare tab (the p50 it has just measured); each brings its own latencies as `Candidate`s.

    rec = recommend([Candidate("fp32", 0.902, 5.1), Candidate("int8-dynamic", 0.897, 2.0),
                     Candidate("early-exit", 0.861, 1.2)], baseline="fp32", budget_pt=1.0)
    rec.chosen      # "int8-dynamic"
    print(rec.explain())

The `cascade` routing policy's threshold is chosen here too, from an accuracy target on the dev split:
`choose_cascade_threshold` simulates the cascade on each variant's per-example dev answers that the build
stored (metadata.DevScores, `dev_scores.json` in the version folder) and returns the lowest threshold that
reaches the target with the share of requests that escalate (the page's cascade control, GET /api/cascade,
`dyngate recommend --cascade`).

    choice = cascade_from_repository(Path("model_repository"), "distilbert-tiny", ["int8-dynamic", "fp32"],
                                     within_pt=0.5)
    choice.threshold, choice.metric, choice.escalation_share
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dyngate_build.errors import ConfigError
from dyngate_build.metadata import DevScores, dev_sample_mismatch, metric_from_counts

BASELINE_VARIANT = "fp32"
DEFAULT_BUDGET_PT = 1.0  # points of the dev metric a recommendation may lose when no budget is given
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


def recommend(candidates: list[Candidate], baseline: str = BASELINE_VARIANT,
              budget_pt: float = DEFAULT_BUDGET_PT, metric_name: str = "accuracy",
              latency: str = "p50 batch 1") -> Recommendation:
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
    dev sample than the `baseline` variant's (`metadata.dev_sample_mismatch`); one without metadata (no
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
            unusable = dev_sample_mismatch(meta.accuracy.n, meta.accuracy.examples_sha256, reference.accuracy.n,
                                           reference.accuracy.examples_sha256, reference.variant, meta.accuracy.name)
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


# --------------------------------------------------------------------------------------- the cascade threshold

@dataclass
class CascadeChoice:
    """The `cascade` policy's threshold chosen for a dev-metric target, and what it gives on the dev split.

    order: the variants, cheapest first (the last always answers). target: the dev metric to reach, a fraction;
    rule: how it was set, in words. threshold: the lowest top-1 threshold whose simulated cascade reaches the
    target (None when none does). metric: the cascade's dev metric at that threshold (at the best threshold when
    none qualifies). escalation_share: share of dev examples the first variant passes on (0..1). answered: per
    variant, the share of dev examples it answers. alone: each variant's own dev metric. n: dev examples.
    """

    order: list[str]
    metric_name: str
    target: float
    rule: str
    threshold: float | None
    metric: float
    escalation_share: float
    answered: dict[str, float]
    alone: dict[str, float]
    n: int

    def explain(self) -> str:
        """A few lines for people: the threshold, the metric it gives and the share of requests that escalate."""
        chain = " → ".join(self.order)
        if self.threshold is None:
            return (f"no cascade threshold reaches {self.rule} on {self.n} dev examples (cascade {chain}); the best "
                    f"gives {self.metric_name} {self.metric:.4f} with {self.escalation_share:.1%} escalating")
        shares = ", ".join(f"{v} {s:.1%}" for v, s in self.answered.items())
        alone = ", ".join(f"{v} {m:.4f}" for v, m in self.alone.items())
        return (f"cascade threshold {self.threshold:.7g}: {self.metric_name} {self.metric:.4f} on {self.n} dev "
                f"examples, {self.escalation_share:.1%} of requests escalate past {self.order[0]}\n"
                f"  the lowest top-1 threshold that reaches {self.rule} (cascade {chain})\n"
                f"  answered by: {shares}; each alone: {alone}")

    def as_dict(self) -> dict:
        return {**asdict(self), "explanation": self.explain()}


def choose_cascade_threshold(steps: list[tuple[str, DevScores]], within_pt: float | None = None,
                             at_least: float | None = None) -> CascadeChoice:
    """The lowest cascade threshold whose answers on the dev split reach a target, with the share that escalates.

    steps: (variant, its DevScores) cheapest first, as the gateway's `cascade` policy calls them: a variant's
    answer is kept when its confidence (runtime.answer_confidence, stored per dev example by the build) is ≥ the
    threshold, else the next one is asked; the last always answers. The cascade is simulated exactly on the
    stored answers at 0 and halfway between each two neighbouring values of {the non-last steps' confidences,
    1}: every routing the dev split can see, with room on both sides so that a served confidence a rounding step
    away from the stored one is routed alike (stored confidences have 6 decimals, thresholds at most 7). Escalation only grows with the threshold, so the lowest
    qualifying one escalates least.
    Give one target: within_pt, points (0.01 of the metric) below the last (most expensive) variant's own dev
    metric, ≥ 0; or at_least, an absolute dev metric in [0, 1].
    Raises ConfigError for no or both targets, a target out of range, fewer than two steps, a variant named twice,
    or steps whose scores were measured on different dev samples (`metadata.dev_sample_mismatch`) or metrics.
    Confidence-based cascading of cheap and expensive models: Wang et al., "IDK Cascades" (2017).
    """
    if len(steps) < 2:
        raise ConfigError(f"a cascade needs two variants or more, got {[v for v, _ in steps]}; name a cheap one "
                          "then an expensive one")
    names = [v for v, _ in steps]
    repeated = sorted({v for v in names if names.count(v) > 1})
    if repeated:
        raise ConfigError(f"the cascade order {','.join(names)} names {', '.join(repeated)} more than once: a variant "
                          "would only be asked again with the same answer; name each variant once, cheapest "
                          "first (e.g. int8-dynamic,fp32)")
    if (within_pt is None) == (at_least is None):
        raise ConfigError("give one accuracy target: within_pt (points below the last variant, e.g. 0.5) or "
                          "at_least (an absolute dev metric, e.g. 0.80)")
    first = steps[0][1]
    for variant, scores in steps[1:]:
        if scores.metric != first.metric or dev_sample_mismatch(scores.n, scores.examples_sha256, first.n,
                                                                first.examples_sha256, names[0], scores.metric):
            raise ConfigError(f"the dev scores of {names[0]} ({first.n} examples, {first.metric}) and {variant} "
                              f"({scores.n} examples, {scores.metric}) were not measured on the same dev examples; "
                              "rebuild both with the same --eval-limit and --data")
    metric_name = first.metric
    confidence = np.array([s.confidence for _, s in steps], dtype=float)  # [K, n]
    counts = [np.array([getattr(s, key) for _, s in steps], dtype=np.int64) for key in ("hits", "predicted", "gold")]
    alone = {v: metric_from_counts(metric_name, s.hits, s.predicted, s.gold) for v, s in steps}
    if within_pt is not None:
        if not math.isfinite(within_pt) or within_pt < 0:
            raise ConfigError(f"within_pt={within_pt!r} must be a number ≥ 0: the points of {metric_name} the "
                              f"cascade may lose against {names[-1]}, e.g. 0.5")
        target = alone[names[-1]] - within_pt / 100.0
        rule = f"within {within_pt:g} pt of {names[-1]} ({metric_name} {alone[names[-1]]:.4f} → ≥ {target:.4f})"
    else:
        if not math.isfinite(at_least) or not 0.0 <= at_least <= 1.0:
            raise ConfigError(f"at_least={at_least!r} must be in [0, 1]: the {metric_name} the cascade must reach, "
                              "e.g. 0.80")
        shown = f"{at_least:.4f}" if round(at_least, 4) == at_least else f"{at_least:.8g}"  # 0.81423 stays so
        target, rule = float(at_least), f"{metric_name} ≥ {shown}"

    columns = np.arange(first.n)

    def simulate(threshold: float) -> tuple[float, np.ndarray]:
        keeps = confidence[:-1] >= threshold  # [K-1, n]
        answering = np.where(keeps.any(axis=0), keeps.argmax(axis=0), len(steps) - 1)
        picked = [c[answering, columns] for c in counts]
        return metric_from_counts(metric_name, *picked), answering

    values = np.unique(np.concatenate([[0.0], confidence[:-1].ravel(), [1.0]]))  # 1.0: room to escalate all
    # the routing changes only at a stored confidence; the threshold returned lies halfway below it, so that a
    # served answer a rounding step away from a dev one is routed as on the dev split
    candidates = np.concatenate([[0.0], (values[1:] + values[:-1]) / 2.0])
    best = None
    for threshold in candidates:
        value, answering = simulate(float(threshold))
        if best is None or value > best[1] + _EPS:
            best = (float(threshold), value, answering)
        if value >= target - _EPS:
            chosen, found = (float(threshold), value, answering), True
            break
    else:
        chosen, found = best, False
    threshold, value, answering = chosen
    answered = {v: float(np.mean(answering == k)) for k, v in enumerate(names)}
    return CascadeChoice(order=names, metric_name=metric_name, target=float(target), rule=rule,
                         threshold=threshold if found else None, metric=float(value),
                         escalation_share=float(np.mean(answering > 0)), answered=answered, alone=alone, n=first.n)


def cascade_steps(entries: list, order: list[str]) -> list[tuple[str, DevScores]]:
    """(variant, DevScores) for `order` (variant names, cheapest first) from repository entries (RepositoryEntry
    of one model): each read from the newest version folder (what Triton serves). ConfigError naming the
    variants when one is unknown; RepositoryError when a variant has no dev scores (built before they were
    stored: rebuild it)."""
    from dyngate_build.repository import newest_version_dir

    by_name = {e.variant: e for e in entries}
    unknown = [v for v in order if v not in by_name]
    if unknown:
        raise ConfigError(f"cascade variants {unknown} are not built; this model's variants are: "
                          f"{', '.join(by_name)}")
    return [(v, DevScores.load(newest_version_dir(by_name[v].folder))) for v in order]


def build_p50(entry) -> float | None:
    """The build's in-process batch-1 p50 of `entry` (a RepositoryEntry) in ms, from its metadata.json; None
    without one."""
    return None if entry.metadata is None else float(entry.metadata.latency_in_process.p50_ms)


def cost_order(entries: list) -> list[str]:
    """Variant names of `entries` (RepositoryEntry of one model) cheapest first, as the `cascade` policy calls them:
    the build's in-process p50 (`build_p50`; none: last), then size, then name."""

    def cost(entry) -> tuple:
        p50 = build_p50(entry)
        return (float("inf") if p50 is None else p50, 0.0 if entry.metadata is None else float(entry.metadata.size_mb),
                entry.variant)

    return [e.variant for e in sorted(entries, key=cost)]


def cascade_order_warning(entries: list, order: list[str]) -> str | None:
    """Why `order` (a cascade, meant cheapest first) is not: a variant of it has a higher build p50 than the next
    one. Names the pair and the order `cost_order` gives. None when no such pair, or a variant of `order` has no
    p50 (unknown variants are `cascade_steps`' error)."""
    by_name = {e.variant: e for e in entries}
    p50 = {v: build_p50(by_name[v]) if v in by_name else None for v in order}
    if any(value is None for value in p50.values()):
        return None
    inverted = [(a, b) for a, b in zip(order, order[1:]) if p50[a] > p50[b]]
    if not inverted:
        return None
    (slower, faster), cheapest = inverted[0], cost_order([by_name[v] for v in order])
    return (f"the cascade {','.join(order)} asks {slower} (build p50 {p50[slower]:.3f} ms) before the faster "
            f"{faster} ({p50[faster]:.3f} ms): a cascade is meant cheapest first (a variant is asked only for "
            f"what the ones before it were not confident about), so here the requests that reach {slower} pay for "
            f"it before the cheaper {faster}; cheapest first by the build's p50: --cascade {','.join(cheapest)}")


def cascade_from_repository(repository: Path, model: str, order: list[str], within_pt: float | None = None,
                            at_least: float | None = None) -> CascadeChoice:
    """`choose_cascade_threshold` for `model`'s variants `order` (cheapest first) in `repository`, from the dev
    scores the build stored (`cascade_steps`)."""
    from dyngate_build.repository import python_variants_by_model

    entries = python_variants_by_model(Path(repository), [model])[model]
    return choose_cascade_threshold(cascade_steps(entries, order), within_pt, at_least)
