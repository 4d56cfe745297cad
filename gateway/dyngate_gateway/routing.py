"""Routing policies: which variant(s) of a model answer one request, and why. Plain Python, no Gradio.

    router = Router(catalog, clients, RoutingConfig(ab_weights={"distilbert-tiny": {"fp32": 3, "torchscript": 1}}))
    await router.aroute("distilbert-tiny", b"a fine film", policy="cascade", threshold=0.9)   # on the event loop
    router.route("distilbert-tiny", b"a fine film", policy="cascade", threshold=0.9)          # without one
    -> {"model": ..., "policy": "cascade", "served_by": "torchscript", "triton_model": ...,
        "route": [{"variant": "fp32", "confidence": 0.62, ...}, {"variant": "torchscript", ...}],
        "reason": "...", "answer": {...}, "latency_ms": ...}

Policies (POLICIES):
- `variant`: the variant named in `variant` (a variant name given as the policy means the same). `variant` is
  this policy's argument only: with a policy that chooses the variant itself (`fastest`, `most-accurate`, `ab`,
  `cascade`), or with a variant name as the policy that names another variant, it is an InputError naming both
  (neither wins silently: each is an explicit request the other would discard).
- `fastest`: lowest p50 among READY variants whose accuracy is within `accuracy_budget` points of the model's
  best (points: 0.01 of the metric's [0, 1] scale, the unit of `dyngate recommend --budget`; 1.0 = one point).
  One source of p50 for all candidates of one decision (`Router.p50s`): this gateway's live round trips when
  every candidate has `MIN_LIVE_SAMPLES` of them, else the build's in-process measurement (metadata
  `latency_in_process`) for all. Live round trips include Triton's, in-process times do not: mixed, the variant
  with live samples would always look slower. The answer's reason names the source.
- `most-accurate`: the READY variant with the highest measured accuracy (ties: the faster one).
  `fastest` and `most-accurate` leave out a variant whose accuracy was measured on another dev sample than the
  reference's (fp32), the rule of `dyngate recommend` (`dyngate_build.metadata.dev_sample_mismatch`).
- `ab`: a weighted random split from the config (`ab_weights[model] = {variant: weight}`, equal weights when
  the model has none), drawn from one seeded RNG, so a seed gives a reproducible sequence. Its answers carry
  `arms`: per arm the requests it answered, their p50/p99 round trips, and its agreement with the next arm on
  the same inputs (a share, `ab_agreement_share`, of its requests is mirrored there in the background by
  dyngate_gateway.shadow).
- `cascade`: READY variants cheapest first (the build's p50, then size); a variant's answer is kept when its
  top-1 probability reaches `threshold`, else the request goes on to the next; the last one always answers.
  Only the low-confidence inputs pay for the bigger variants: input-adaptive routing at the serving level.

`exit_threshold` (any policy) is sent to Triton as the request parameter `exit_threshold`: early-exit variants
leave at the first off-ramp whose confidence reaches it; other variants ignore it. It is checked here by the
served runtime's own rule (`dyngate_build.runtime.check_exit_threshold`: a number ≥ 0, ≥ 1 = never exit, no
booleans), so the gateway and Triton accept and refuse the same values. A request parameter that would do nothing
is an InputError naming the variants that read it (`ModelView.readers`, from each variant's runtime.json): with
`variant`, the named variant must read it; a policy that chooses passes it to whichever variant answers (a cascade
may escalate from an early-exit variant to fp32), so one of the variants it chooses from must read it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from dyngate_build import runtime
from dyngate_build.errors import ConfigError, InputError, ServingError, TritonUnreachable
from dyngate_build.metadata import dev_sample_mismatch
from dyngate_build.runtime import answer_confidence as confidence  # the rule the build's dev scores use too
from dyngate_gateway.handlers import ClientPool, ModelView, read_input, summarize
from dyngate_measure.recommend import build_p50, cost_order, reference_metadata

POLICIES = ("variant", "fastest", "most-accurate", "ab", "cascade")
MIN_LIVE_SAMPLES = 5
LIVE_WINDOW = 200
READY_TTL_S = 1.0
# A variant whose request failed on the server side (e.g. its python stub crashed: Triton still lists it READY)
# is left out of the policies' choice for this long, so `fastest`, `most-accurate`, `ab` and `cascade` answer
# from the other variants meanwhile. A named variant (`variant` policy) is always tried.
FAILED_TTL_S = 30.0


@dataclass
class RoutingConfig:
    """Defaults of the routing policies (a request may override budget and threshold)."""

    accuracy_budget: float = 1.0  # points (0.01 of the metric's [0, 1] scale), as `dyngate recommend --budget`
    cascade_threshold: float = 0.9
    ab_weights: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> {variant: weight}
    cascade_order: dict[str, list[str]] = field(default_factory=dict)  # model -> variants (overrides cost order)
    seed: int = 0
    # share of `ab` requests also sent, in the background, to another arm to measure the arms' agreement (0: off)
    ab_agreement_share: float = 0.1

    def __post_init__(self):
        if not 0.0 <= float(self.ab_agreement_share) <= 1.0:
            raise ConfigError(f"routing.ab_agreement_share={self.ab_agreement_share!r} is outside [0, 1]: the share "
                              "of ab requests mirrored to another arm to measure agreement (0 turns it off)")


def _accuracy(view: ModelView, variant: str) -> float | None:
    meta = view.variants[variant].metadata
    return None if meta is None else float(meta.accuracy.value)


def _metric_mismatch(view: ModelView, variant: str) -> str | None:
    """Why the variant's dev metric cannot be set beside the model's reference (fp32, else its first variant):
    measured on another dev sample (`dyngate_build.metadata.dev_sample_mismatch`, the rule `dyngate recommend`
    applies); None when comparable."""
    meta = view.variants[variant].metadata
    reference = reference_metadata(list(view.variants.values()))
    if meta is None or reference is None:
        return None
    return dev_sample_mismatch(meta.accuracy.n, meta.accuracy.examples_sha256, reference.accuracy.n,
                               reference.accuracy.examples_sha256, reference.variant, meta.accuracy.name)


def _size(view: ModelView, variant: str) -> float:
    meta = view.variants[variant].metadata
    return 0.0 if meta is None else float(meta.size_mb)


class LiveLatency:
    """Rolling round trips (ms) per Triton model, as this gateway measured them; thread-safe."""

    def __init__(self, window: int = LIVE_WINDOW):
        self._times: dict[str, deque] = {}
        self._lock = threading.Lock()
        self.window = window

    def record(self, triton_model: str, ms: float) -> None:
        with self._lock:
            self._times.setdefault(triton_model, deque(maxlen=self.window)).append(float(ms))

    def p50(self, triton_model: str) -> tuple[float | None, int]:
        with self._lock:
            values = list(self._times.get(triton_model, ()))
        return (float(np.percentile(values, 50)) if values else None), len(values)


class ArmCounts:
    """Requests the `ab` policy answered per arm and their round trips (ms, the last `window`), per model;
    thread-safe."""

    def __init__(self, window: int = 1000):
        self.window = window
        self._counts: dict[tuple[str, str], int] = {}
        self._times: dict[tuple[str, str], deque] = {}
        self._lock = threading.Lock()

    def record(self, model: str, arm: str, ms: float) -> None:
        with self._lock:
            key = (model, arm)
            self._counts[key] = self._counts.get(key, 0) + 1
            self._times.setdefault(key, deque(maxlen=self.window)).append(float(ms))

    def report(self, model: str, arms: list[str]) -> dict[str, dict]:
        """{arm: {"requests", "p50_ms", "p99_ms"}} for each of `arms` (p50/p99 None before its first request)."""
        with self._lock:
            out = {}
            for arm in arms:
                times = list(self._times.get((model, arm), ()))
                out[arm] = {"requests": self._counts.get((model, arm), 0),
                            "p50_ms": round(float(np.percentile(times, 50)), 3) if times else None,
                            "p99_ms": round(float(np.percentile(times, 99)), 3) if times else None}
            return out


class Router:
    """Answers `route(...)` for the models of `catalog` through `clients` (one TritonClient per thread)."""

    def __init__(self, catalog: dict[str, ModelView], clients: ClientPool, config: RoutingConfig | None = None,
                 limits=None):
        self.catalog, self.clients = catalog, clients
        self.config = config or RoutingConfig()
        self.limits = limits
        self.live = LiveLatency()
        self._rng = random.Random(self.config.seed)
        self._rng_lock = threading.Lock()
        self._ready: tuple[float, set[str]] | None = None
        self._ready_lock = threading.Lock()
        self._failed: dict[str, tuple[float, str]] = {}  # triton model -> (monotonic time of failure, error)
        self.shadow = None  # a dyngate_gateway.shadow.Shadow: routed requests are offered to it once answered
        self.arms = ArmCounts()

    # ---- state

    def ready_models(self, fresh: bool = False) -> set[str]:
        """Triton's READY models (cached READY_TTL_S); ServingError when Triton is unreachable."""
        cached = None if fresh else self._cached_ready()
        if cached is not None:
            return cached
        client = self.clients.status_client()
        try:
            ready = set(client.ready_models())
        finally:
            client.close()
        return self._keep_ready(ready)

    async def aready_models(self, fresh: bool = False) -> set[str]:
        """`ready_models` on the event loop (its shared async client), same cache."""
        cached = None if fresh else self._cached_ready()
        if cached is not None:
            return cached
        return self._keep_ready(set(await self.clients.aio().ready_models()))

    def _cached_ready(self) -> set[str] | None:
        with self._ready_lock:
            if self._ready and time.monotonic() - self._ready[0] < READY_TTL_S:
                return self._ready[1]
        return None

    def _keep_ready(self, ready: set[str]) -> set[str]:
        with self._ready_lock:
            self._ready = (time.monotonic(), ready)
        return ready

    def view(self, model: str | None) -> ModelView:
        view = self.catalog.get(model or "")
        if view is None:
            raise InputError(f"unknown model {model!r}; the repository's models are: "
                             f"{', '.join(self.catalog) or 'none (run dyngate build)'}")
        return view

    def p50s(self, view: ModelView, variants: list[str]) -> tuple[dict[str, float | None], str]:
        """p50 (ms) of each of `variants` from ONE source, and that source in words, for one decision.

        This gateway's live round trips (LiveLatency, Triton round trip included) when every one of `variants`
        has MIN_LIVE_SAMPLES of them; else the build's in-process p50 (metadata `latency_in_process`; None
        where a variant has no metadata) for all of them, so a variant with live samples is never compared
        against variants timed in process.
        """
        live = {v: self.live.p50(view.variants[v].name) for v in variants}
        counts = [n for _, n in live.values()]
        if variants and min(counts) >= MIN_LIVE_SAMPLES:
            return {v: p for v, (p, _) in live.items()}, f"live p50, at least {min(counts)} requests each"
        have = sum(n >= MIN_LIVE_SAMPLES for n in counts)
        source = "build p50 (in process) for all"
        if have:
            source += f": only {have} of {len(variants)} have {MIN_LIVE_SAMPLES} live requests"
        return {v: build_p50(view.variants[v]) for v in variants}, source

    def candidates(self, view: ModelView) -> dict[str, dict]:
        """Per variant: ready, accuracy, p50 and its source (one source for the READY variants), as the policies
        see them now."""
        ready = self.ready_models()
        names = list(view.variants)
        in_ready, ready_source = self.p50s(view, [v for v in names if view.variants[v].name in ready])
        others, other_source = self.p50s(view, [v for v in names if view.variants[v].name not in ready])
        out = {}
        for variant, entry in view.variants.items():
            up = entry.name in ready
            out[variant] = {"triton_model": entry.name, "ready": up, "accuracy": _accuracy(view, variant),
                            "p50_ms": (in_ready if up else others)[variant],
                            "p50_source": ready_source if up else other_source, "size_mb": _size(view, variant)}
        return out

    def cascade_order(self, view: ModelView, ready: set[str] | None = None) -> list[str]:
        """Variants cheapest first (config order if given): the build's p50, then size, then name."""
        names = list(self.config.cascade_order.get(view.name) or [])
        if not names:
            names = cost_order(list(view.variants.values()))
        if ready is not None:
            names = [v for v in names if view.variants[v].name in ready]
        return names

    # ---- the entry point

    def route(self, model: str, raw: bytes | str | None = None, policy: str | None = None, variant: str | None = None,
              accuracy_budget: float | None = None, threshold: float | None = None,
              exit_threshold: float | None = None, image=None) -> dict:
        """`aroute` for plain (not async) callers: scripts, tests. It runs on an event loop of its own in a
        worker thread (so a loop already running in the caller's thread, e.g. Playwright's, is no obstacle)."""

        async def once():
            try:
                return await self.aroute(model, raw, policy, variant, accuracy_budget, threshold, exit_threshold,
                                         image)
            finally:
                await self.clients.areset()  # the loop ends here: so does its client

        with concurrent.futures.ThreadPoolExecutor(1) as worker:
            return worker.submit(lambda: asyncio.run(once())).result()

    async def aroute(self, model: str, raw: bytes | str | None = None, policy: str | None = None,
                     variant: str | None = None, accuracy_budget: float | None = None, threshold: float | None = None,
                     exit_threshold: float | None = None, image=None) -> dict:
        """Answer one input of `model` by `policy`; the answer names the variant(s) that served it and why.

        raw: text (str) or the encoded bytes; image: a file path or bytes for image models (instead of raw).
        policy: one of POLICIES or a variant name; None or blank: 'variant' when `variant` is given, else
        'fastest' (the JSON route's rule). InputError for a `variant` beside a policy that chooses the variant.
        Runs on the event loop: Triton is asked through the loop's shared async client, nothing blocks.
        Once answered, the request is offered to `self.shadow` (when set), which may mirror it to a candidate
        variant in the background; the answer is neither changed nor delayed by that.
        """
        view = self.view(model)
        answer, data, params = await self._route(view, raw, policy, variant, accuracy_budget, threshold,
                                                 exit_threshold, image)
        if answer["policy"] == "ab":
            arms = list(self._ab_weights(view))
            self.arms.record(view.name, answer["served_by"], answer["latency_ms"])
            if self.shadow is not None:
                self.shadow.compare_arms(view, arms, self.config.ab_agreement_share)
        if self.shadow is not None:
            self.shadow.offer(view, data, params, answer)
        if answer["policy"] == "ab":
            answer["arms"] = self.ab_report(view)
        return answer

    def ab_report(self, view: ModelView) -> dict[str, dict]:
        """Per arm of `view`'s A/B split: {"weight", "requests", "p50_ms", "p99_ms", "agreement"} where agreement
        ({"compared_with", "mirrored", "top1_agreement", "max_abs_delta"}, or None before any comparison) is
        measured on copies of the arm's requests answered by the next arm (RoutingConfig.ab_agreement_share)."""
        weights = self._ab_weights(view)
        report = self.arms.report(view.name, list(weights))
        agreement = self.shadow.arm_agreement(view.name) if self.shadow is not None else {}
        return {arm: {"weight": weights[arm], **report[arm], "agreement": agreement.get(arm)} for arm in weights}

    async def _route(self, view: ModelView, raw, policy, variant, accuracy_budget, threshold, exit_threshold,
                     image) -> tuple[dict, bytes, dict | None]:
        """aroute() without the shadow: (answer, the bytes sent, the request parameters)."""
        text = raw if isinstance(raw, str) else None
        image = image if image not in (None, "", b"") else (raw if isinstance(raw, (bytes, bytearray)) else None)
        if view.is_text and isinstance(image, (bytes, bytearray)) and text is None:
            try:
                text, image = bytes(image).decode("utf-8"), None
            except UnicodeDecodeError as e:
                raise InputError(f"the text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        data = read_input(view, text, image, self.limits)
        policy = (policy or "").strip() or ("variant" if variant else "fastest")
        if policy in view.variants:  # a variant name as the policy
            if variant and variant != policy:
                raise InputError(f"policy={policy!r} and variant={variant!r} name two variants; send one of them "
                                 f"(as variant, with policy 'variant' or no policy)")
            policy, variant = "variant", policy
        if policy not in POLICIES:
            raise InputError(f"policy={policy!r} is not known; choose one of: {', '.join(POLICIES)} "
                             f"(or a variant name of {view.name}: {', '.join(view.variant_names)})")
        if variant and policy != "variant":
            raise InputError(f"variant={variant!r} conflicts with policy={policy!r}: {policy!r} chooses the variant "
                             f"itself and would ignore it; send policy 'variant' (or no policy) to be answered by "
                             f"{variant!r}, or leave variant out to let {policy!r} choose")
        params = None
        if exit_threshold is not None and str(exit_threshold).strip() != "":  # blank: the variant's default
            try:
                params = {"exit_threshold": runtime.check_exit_threshold(exit_threshold)}  # Triton's own rule
            except runtime.InputError as e:
                raise InputError(str(e)) from None
        budget = self.config.accuracy_budget if accuracy_budget in (None, "") else float(accuracy_budget)
        if not math.isfinite(budget) or budget < 0:
            raise InputError(f"accuracy_budget={budget} must be a number ≥ 0: the points of accuracy the variant may "
                             "lose against the best, e.g. 1.0 (the unit of dyngate recommend --budget)")
        cut = self.config.cascade_threshold if threshold in (None, "") else float(threshold)
        if not 0.0 <= cut <= 1.0:
            raise InputError(f"threshold={cut} is outside [0, 1]; it is the top-1 probability a cascade step "
                             "must reach to answer")

        if policy == "variant":
            if not variant:
                raise InputError(f"policy 'variant' needs a variant: one of {', '.join(view.variant_names)}")
            if variant not in view.variants:
                raise InputError(f"unknown variant {variant!r} for model {view.name}; its variants are: "
                                 f"{', '.join(view.variant_names)}")
        if params:
            self._check_parameters(view, policy, variant, params)
        if policy == "variant":
            chosen, reason = variant, f"variant {variant!r} was asked for"
            step = await self._call(view, chosen, data, params)
            return self._answer(view, policy, [step], reason, params), data, params
        ready = await self.aready_models()
        if policy == "cascade":
            return await self._cascade(view, data, cut, params, ready), data, params
        skipped: list[str] = []
        while True:
            chosen, reason = self._choose(view, policy, budget, ready)
            try:
                step = await self._call(view, chosen, data, params)
            except ServingError as e:
                if isinstance(e, TritonUnreachable) or not self._others_left(view, chosen, ready):
                    raise
                skipped.append(f"{chosen} failed ({e})")
                continue  # _call marked it failed: the next choice leaves it out
            if skipped:
                reason += "; skipped " + "; ".join(skipped)
            return self._answer(view, policy, [step], reason, params), data, params

    def _check_parameters(self, view: ModelView, policy: str, variant: str | None, params: dict) -> None:
        """InputError for a request parameter that no variant `policy` may answer with reads (it would do nothing):
        with policy 'variant' the named variant must read it; a policy that chooses passes it to whichever variant
        answers, so one of those it chooses from (cascade's order, ab's arms, else all) must read it."""
        if policy == "variant":
            pool = [variant]
        elif policy == "cascade":
            pool = self.cascade_order(view)
        elif policy == "ab":
            pool = list(self._ab_weights(view))
        else:
            pool = view.variant_names
        for name, value in params.items():
            readers = view.readers(name)
            if any(v in readers for v in pool):
                continue
            fix = (f"the variants of {view.name} that read it: {', '.join(readers)}; send one of them as variant, or "
                   f"leave {name} out" if readers else
                   f"no variant of {view.name} reads it (early exit does: dyngate build --techniques early-exit); "
                   f"leave {name} out")
            if policy == "variant":
                raise InputError(f"{name}={value!r} does nothing for variant {variant!r} of {view.name}: it does "
                                 f"not read {name}; {fix}")
            raise InputError(f"{name}={value!r} does nothing with policy {policy!r} on {view.name}: none of the "
                             f"variants it chooses from ({', '.join(pool)}) reads {name}; {fix}")

    # ---- policies

    def _ready_variants(self, view: ModelView, ready: set[str]) -> list[str]:
        """READY variants of `view`, less those that failed within FAILED_TTL_S (unless that leaves none)."""
        names = [v for v in view.variant_names if view.variants[v].name in ready]
        if not names:
            raise ServingError(f"no variant of {view.name} is loaded on Triton at {self.clients.url}; load one "
                               "on the Models tab (or restart Triton with them)")
        healthy = [v for v in names if not self._recently_failed(view.variants[v].name)]
        return healthy or names

    def _recently_failed(self, triton_model: str) -> bool:
        with self._ready_lock:
            failed = self._failed.get(triton_model)
        return failed is not None and time.monotonic() - failed[0] < FAILED_TTL_S

    def _others_left(self, view: ModelView, variant: str, ready: set[str]) -> bool:
        """Whether a variant other than `variant` is READY and has not failed recently."""
        return any(v != variant and view.variants[v].name in ready and not self._recently_failed(view.variants[v].name)
                   for v in view.variant_names)

    def _choose(self, view: ModelView, policy: str, budget: float, ready: set[str]) -> tuple[str, str]:
        names = self._ready_variants(view, ready)
        # a metric measured on another number of dev examples than the reference's is not compared at all
        mismatch = {v: _metric_mismatch(view, v) for v in names}
        accuracy = {v: None if mismatch[v] else _accuracy(view, v) for v in names}
        not_comparable = "".join(f"; not comparable: {v} ({why})" for v, why in mismatch.items() if why)
        known = [a for a in accuracy.values() if a is not None]

        def fastest_of(pool: list[str]) -> tuple[str, float, str]:
            p50, source = self.p50s(view, pool)  # one source for the whole pool
            chosen = min(pool, key=lambda v: p50[v] if p50[v] is not None else float("inf"))
            return chosen, (p50[chosen] if p50[chosen] is not None else float("inf")), source

        if policy == "most-accurate":
            if not known:
                chosen, _, source = fastest_of(names)
                return chosen, (f"no variant has a measured accuracy; took the fastest ({chosen}, {source})"
                                + not_comparable)
            top = max(accuracy[v] if accuracy[v] is not None else -1 for v in names)
            chosen, _, _ = fastest_of([v for v in names if (accuracy[v] if accuracy[v] is not None else -1) == top])
            return chosen, f"highest accuracy among ready variants: {accuracy[chosen]:.4f}" + not_comparable
        if policy == "fastest":
            best = max(known) if known else None
            allowed = [v for v in names if not mismatch[v]
                       and (best is None or accuracy[v] is None or accuracy[v] >= best - budget / 100.0 - 1e-9)] or names
            chosen, p50, source = fastest_of(allowed)
            left_out = [v for v in names if v not in allowed and not mismatch[v]]
            reason = (f"lowest p50 ({p50:.3f} ms, {source}) among ready variants within "
                      f"{budget:g} pt (accuracy budget) of the best ({best if best is None else round(best, 4)})")
            if left_out:
                reason += f"; outside the budget: {', '.join(left_out)}"
            return chosen, reason + not_comparable
        # ab
        weights = self._ab_weights(view)
        pool = [(v, w) for v, w in weights.items() if v in names]
        if not pool:
            raise ServingError(f"ab split for {view.name}: none of {sorted(weights)} with weight > 0 is loaded")
        total = sum(w for _, w in pool)
        with self._rng_lock:
            chosen = self._rng.choices([v for v, _ in pool], weights=[w for _, w in pool])[0]
        share = dict(pool)[chosen] / total
        return chosen, f"A/B split {dict(pool)}: drew {chosen} (share {share:.0%})"

    def _ab_weights(self, view: ModelView) -> dict[str, float]:
        """{arm: weight > 0} of `view`'s A/B split (config `ab_weights`, equal weights when it has none)."""
        weights = dict(self.config.ab_weights.get(view.name) or {v: 1.0 for v in view.variant_names})
        unknown = [v for v in weights if v not in view.variants]
        if unknown:
            raise InputError(f"ab_weights for {view.name} name unknown variants {unknown}; its variants are "
                             f"{', '.join(view.variant_names)}")
        return {v: float(w) for v, w in weights.items() if float(w) > 0}

    async def _cascade(self, view: ModelView, data: bytes, cut: float, params: dict | None, ready: set[str]) -> dict:
        order = self.cascade_order(view, ready)
        if not order:
            self._ready_variants(view, ready)  # raises the clear error
        order = [v for v in order if not self._recently_failed(view.variants[v].name)] or order
        steps, skipped = [], []
        for i, variant in enumerate(order):
            try:
                step = await self._call(view, variant, data, params)
            except ServingError as e:
                if isinstance(e, TritonUnreachable) or i == len(order) - 1:
                    raise
                skipped.append(f"{variant} failed ({e})")
                continue
            steps.append(step)
            if step["confidence"] >= cut:
                reason = (f"cascade {' → '.join(order)}: {variant} answered with top-1 probability "
                          f"{step['confidence']:.4f} ≥ threshold {cut}")
                break
            if i == len(order) - 1:
                reason = (f"cascade {' → '.join(order)}: no variant reached threshold {cut}; the last one "
                          f"({variant}) answered")
        if len(steps) > 1:
            reason += "; escalated from " + ", ".join(f"{s['variant']} ({s['confidence']:.4f} < {cut})"
                                                      for s in steps[:-1])
        if skipped:
            reason += "; skipped " + "; ".join(skipped)
        return self._answer(view, "cascade", steps, reason, params)

    # ---- helpers

    async def _call(self, view: ModelView, variant: str, data: bytes, params: dict | None) -> dict:
        name = view.variants[variant].name
        try:
            result = await self.clients.aio().predict(name, data, params)
        except ServingError as e:
            if isinstance(e, TritonUnreachable):
                await self.clients.areset()
            else:
                with self._ready_lock:
                    self._failed[name] = (time.monotonic(), str(e))
            raise
        with self._ready_lock:
            self._failed.pop(name, None)
        self.live.record(name, result.latency_ms)
        label, score = summarize(result.answer)
        step = {"variant": variant, "triton_model": name, "prediction": label,
                "confidence": confidence(result.answer), "latency_ms": round(result.latency_ms, 3),
                "answer": result.answer}
        if result.answer.get("exit_layer") is not None:
            step["exit_layer"] = result.answer["exit_layer"]
        return step

    @staticmethod
    def _answer(view: ModelView, policy: str, steps: list[dict], reason: str, params: dict | None) -> dict:
        last = steps[-1]
        return {"model": view.name, "policy": policy, "served_by": last["variant"],
                "triton_model": last["triton_model"], "prediction": last["prediction"],
                "confidence": last["confidence"], "route": [{k: v for k, v in s.items() if k != "answer"}
                                                            for s in steps],
                "reason": reason, "answer": last["answer"], "parameters": params or {},
                "latency_ms": round(sum(s["latency_ms"] for s in steps), 3)}
