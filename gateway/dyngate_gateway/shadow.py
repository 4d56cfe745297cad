"""Shadow traffic: mirror a share of a model's live requests to a candidate variant without changing any answer,
and measure how the candidate agrees with the variant that served each request. Plain Python, no Gradio.

Shadowing belongs outside Triton (asked of Triton, answered so): the gateway already has the request and the
served answer, so it sends a copy to the candidate afterwards and compares.

    shadow = Shadow(clients)                                   # a ClientPool: one TritonClient per thread
    shadow.configure(view, "int8-dynamic", share=0.25, queue_limit=64)
    router.shadow = shadow                                     # Router.route offers every answered request
    shadow.stats("distilbert-tiny")                            # GET /api/shadow: totals and per-minute rows

Guarantees:
- off by default (no model is shadowed until `configure`), and `stop` turns a model's shadow off;
- bounded: counts for the last MINUTES_KEPT minutes; a deterministic `share` of the model's routed requests is mirrored (share 0.25 = every 4th), into a
  queue of at most `queue_limit` requests; when the queue is full the copy is dropped (counted), never waited
  for;
- the primary is never slowed or failed by the candidate: `offer` only puts a copy in the queue (no I/O, no
  wait) and one background thread per shadowed model calls the candidate; its errors are counted, not raised.

The same machinery compares the arms of the `ab` routing policy with each other (`compare_arms`): a share of
the requests an arm served goes to the next arm, so `arm_agreement` gives each arm's agreement on the same
inputs (the router adds it to its per-arm counts and p50/p99).

Agreement of the candidate with the served answer on the same input (`agreement`): top-1 label equal and the
largest |Δ| of the class probabilities for classification; for NER, the sentence's entity set equal (type and
character span), entity-level micro F1 (candidate against served, `dyngate_build.evaluate.entity_f1`) and the
largest |Δ| of the word scores. Latency: the served request's round trip and the candidate's, per minute.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from dyngate_build.errors import DyngateError, InputError
from dyngate_build.evaluate import entity_f1
from dyngate_gateway.handlers import ClientPool, ModelView

MAX_QUEUE_LIMIT = 10_000
MINUTES_KEPT = 60
DEFAULT_QUEUE_LIMIT = 64


def agreement(served: dict, candidate: dict) -> dict:
    """How `candidate` (an answer dict) agrees with `served` on the same input.

    Classification: {"top1": bool, "max_abs_delta": largest |Δ probability| over the classes}.
    NER: {"top1": the entity sets are equal, "max_abs_delta": largest |Δ word score| over words at the same
    span, "entities": (candidate set, served set) of (type, start, end) for entity F1}."""
    if "entities" in served or "entities" in candidate:
        ours = {(e["entity"], e["start"], e["end"]) for e in candidate.get("entities") or []}
        theirs = {(e["entity"], e["start"], e["end"]) for e in served.get("entities") or []}
        words = {(w["start"], w["end"]): float(w["score"]) for w in served.get("words") or []}
        deltas = [abs(float(w["score"]) - words[(w["start"], w["end"])]) for w in candidate.get("words") or []
                  if (w["start"], w["end"]) in words]
        return {"top1": ours == theirs, "max_abs_delta": max(deltas, default=0.0), "entities": (ours, theirs)}
    p = served.get("probabilities") or {}
    q = candidate.get("probabilities") or {}
    delta = max((abs(float(p[k]) - float(q.get(k, 0.0))) for k in p), default=0.0)
    return {"top1": served.get("label") == candidate.get("label"), "max_abs_delta": delta}


@dataclass
class _Minute:
    """Counts of one wall-clock minute of one shadowed model."""

    start: float
    mirrored: int = 0  # copies answered by the candidate (compared)
    agreed: int = 0
    max_abs_delta: float = 0.0
    errors: int = 0
    dropped: int = 0
    served_ms: list[float] = field(default_factory=list)
    candidate_ms: list[float] = field(default_factory=list)
    predicted: list[set] = field(default_factory=list)  # NER: candidate entity sets
    gold: list[set] = field(default_factory=list)  # NER: served entity sets

    def row(self) -> dict:
        return {"minute": time.strftime("%H:%M", time.gmtime(self.start)), **_summary(self)}


def _p(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _entity_f1(predicted: list[set], gold: list[set]) -> float | None:
    """Entity-level micro F1 of the candidate against the served answers; 1.0 when neither found an entity,
    None for classification (no entity sets)."""
    if not gold and not predicted:
        return None
    if not any(gold) and not any(predicted):
        return 1.0
    return round(entity_f1(predicted, gold), 4)


def _summary(m: _Minute) -> dict:
    return {"mirrored": m.mirrored, "top1_agreement": round(m.agreed / m.mirrored, 4) if m.mirrored else None,
            "max_abs_delta": m.max_abs_delta if m.mirrored else None,  # unrounded: 1e-8 is not 0
            "entity_f1": _entity_f1(m.predicted, m.gold),
            "served_p50_ms": _p(m.served_ms, 50), "candidate_p50_ms": _p(m.candidate_ms, 50),
            "candidate_p99_ms": _p(m.candidate_ms, 99), "errors": m.errors, "dropped": m.dropped}


def _merged(minutes: list[_Minute]) -> _Minute:
    """One bucket holding the counts of `minutes` (the totals over the minutes kept)."""
    total = _Minute(minutes[0].start if minutes else 0.0)
    for m in minutes:
        total.mirrored += m.mirrored
        total.agreed += m.agreed
        total.max_abs_delta = max(total.max_abs_delta, m.max_abs_delta)
        total.errors += m.errors
        total.dropped += m.dropped
        total.served_ms += m.served_ms
        total.candidate_ms += m.candidate_ms
        total.predicted += m.predicted
        total.gold += m.gold
    return total


class _ModelShadow:
    """One shadowed model: its settings, bounded queue, worker thread and counts.

    candidate: the variant every copy goes to; None for an A/B comparison, where a copy goes to the arm after
    the one that served it (in `arms` order), so each arm is compared with another on the same inputs."""

    def __init__(self, view: ModelView, candidate: str | None, share: float, queue_limit: int, clients: ClientPool,
                 arms: list[str] | None = None):
        self.view, self.candidate, self.share, self.queue_limit = view, candidate, share, queue_limit
        self.arms = list(arms or [])
        self.pairs: dict[tuple[str, str], list] = {}  # (served, compared with) -> [mirrored, agreed, max |Δ|]
        self.clients = clients
        self.queue: queue.Queue = queue.Queue(maxsize=queue_limit)
        self.lock = threading.Lock()
        self.seen = 0  # routed requests of the model since the shadow started
        self.offered = 0  # of them, the share picked for mirroring
        self.same_variant = 0  # picked but served by the candidate itself: nothing to compare
        self.minutes: deque[_Minute] = deque(maxlen=MINUTES_KEPT)
        self.last_error: str | None = None
        self.running = True  # False once stopped (its last stats are still handed out)
        self.thread = threading.Thread(target=self._work, name=f"dyngate-shadow-{view.name}", daemon=True)
        self.thread.start()

    def _minute(self) -> _Minute:
        start = math.floor(time.time() / 60) * 60
        if not self.minutes or self.minutes[-1].start != start:
            self.minutes.append(_Minute(start))
        return self.minutes[-1]

    def offer(self, data: bytes, params: dict | None, answer: dict) -> bool:
        """Pick this request by share; queue a copy without waiting. True when queued."""
        with self.lock:
            if not self.running:
                return False
            n = self.seen
            self.seen += 1
            if math.floor((n + 1) * self.share) <= math.floor(n * self.share):
                return False
            served = answer.get("served_by")
            candidate = self.candidate
            if candidate is None:  # A/B: the next arm
                if served not in self.arms or len(self.arms) < 2:
                    return False
                candidate = self.arms[(self.arms.index(served) + 1) % len(self.arms)]
            self.offered += 1
            if served == candidate:
                self.same_variant += 1
                return False
        try:
            self.queue.put_nowait((data, params, answer, candidate))
            return True
        except queue.Full:
            with self.lock:
                self._minute().dropped += 1
            return False

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None or not self.running:
                return
            data, params, answer, candidate = item
            try:
                result = self.clients.get().predict(self.view.variants[candidate].name, data, params)
            except Exception as e:  # noqa: BLE001 - whatever the candidate does is counted, never raised
                with self.lock:
                    self._minute().errors += 1
                    self.last_error = str(e) if isinstance(e, DyngateError) else f"{type(e).__name__}: {e}"
                continue
            agree = agreement(answer["answer"], result.answer)
            with self.lock:
                bucket = self._minute()
                bucket.mirrored += 1
                bucket.agreed += int(agree["top1"])
                bucket.max_abs_delta = max(bucket.max_abs_delta, float(agree["max_abs_delta"]))
                bucket.served_ms.append(float(answer["latency_ms"]))
                bucket.candidate_ms.append(float(result.latency_ms))
                if "entities" in agree:
                    bucket.predicted.append(agree["entities"][0])
                    bucket.gold.append(agree["entities"][1])
                pair = self.pairs.setdefault((answer["served_by"], candidate), [0, 0, 0.0])
                pair[0] += 1
                pair[1] += int(agree["top1"])
                pair[2] = max(pair[2], float(agree["max_abs_delta"]))

    def stop(self) -> None:
        """Stop mirroring: what is queued is dropped and the worker ends after its current copy."""
        with self.lock:
            self.running = False
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        try:
            self.queue.put_nowait(None)  # wakes a waiting worker; a busy one sees `running` after its copy
        except queue.Full:
            pass

    def stats(self) -> dict:
        """The settings, request counts, totals over the minutes kept and one row per minute."""
        with self.lock:
            return {"model": self.view.name, "candidate": self.candidate, "enabled": self.running,
                    "share": self.share, "queue_limit": self.queue_limit, "queued": self.queue.qsize(),
                    "seen": self.seen, "offered": self.offered, "same_variant": self.same_variant,
                    "last_error": self.last_error, "totals": _summary(_merged(list(self.minutes))),
                    "minutes": [m.row() for m in self.minutes],
                    "pairs": [{"served": a, "compared_with": b, "mirrored": n, "agreed": k,
                               "top1_agreement": round(k / n, 4), "max_abs_delta": d}
                              for (a, b), (n, k, d) in sorted(self.pairs.items())]}


class Shadow:
    """Shadow traffic for the gateway's models (see the module docstring). Thread-safe."""

    def __init__(self, clients: ClientPool):
        self.clients = clients
        self._models: dict[str, _ModelShadow] = {}
        self._ab: dict[str, _ModelShadow] = {}  # model -> its A/B arms compared with each other
        self._lock = threading.Lock()

    def configure(self, view: ModelView, candidate: str, share: float, queue_limit: int = DEFAULT_QUEUE_LIMIT) -> dict:
        """Start (or restart, counts reset) shadowing `view`'s routed requests to its variant `candidate`.

        share: fraction of routed requests mirrored, in (0, 1]; queue_limit: copies waiting at most, in
        [1, MAX_QUEUE_LIMIT]. InputError naming the field for an unknown candidate or a value out of range.
        Returns the model's stats."""
        if candidate not in view.variants:
            raise InputError(f"candidate={candidate!r} is not a variant of {view.name}; its variants are: "
                             f"{', '.join(view.variant_names)}")
        try:
            share, queue_limit = float(share), int(queue_limit)
        except (TypeError, ValueError):
            raise InputError(f"share={share!r} and queue_limit={queue_limit!r} must be numbers") from None
        if not 0.0 < share <= 1.0:
            raise InputError(f"share={share} is outside (0, 1]: the fraction of {view.name}'s routed requests "
                             "mirrored to the candidate (e.g. 0.1); stop the shadow to turn it off")
        if not 1 <= queue_limit <= MAX_QUEUE_LIMIT:
            raise InputError(f"queue_limit={queue_limit} is outside [1, {MAX_QUEUE_LIMIT}]: copies that may wait "
                             "for the candidate; more are dropped")
        with self._lock:
            old = self._models.pop(view.name, None)
            self._models[view.name] = _ModelShadow(view, candidate, share, queue_limit, self.clients)
        if old is not None:
            old.stop()
        return self.stats(view.name)

    def stop(self, model: str) -> dict | None:
        """Turn `model`'s shadow off (its last counts are returned); None when it had none."""
        with self._lock:
            shadow = self._models.pop(model, None)
        if shadow is None:
            return None
        shadow.stop()
        return shadow.stats()

    def offer(self, view: ModelView, data: bytes, params: dict | None, answer: dict) -> bool:
        """Called after a routed request was answered: mirror it when `view` is shadowed and the share picks it
        (and, for an `ab` answer, to another arm when `compare_arms` is on). Never blocks and never raises for
        the candidate's sake. True when a copy was queued."""
        shadow = self._models.get(view.name)
        queued = shadow.offer(data, params, answer) if shadow is not None else False
        ab = self._ab.get(view.name) if answer.get("policy") == "ab" else None
        if ab is not None:
            queued = ab.offer(data, params, answer) or queued
        return queued

    def compare_arms(self, view: ModelView, arms: list[str], share: float,
                     queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        """Compare `view`'s A/B arms on the same inputs: a `share` of the requests the `ab` policy answers is
        sent in the background to the next arm (bounded queue, as a shadow). Kept while `arms` stay the same;
        share 0 turns it off."""
        with self._lock:
            current = self._ab.get(view.name)
            if current is not None and current.arms == list(arms) and current.share == share:
                return
            self._ab.pop(view.name, None)
            if share > 0 and len(arms) >= 2:
                self._ab[view.name] = _ModelShadow(view, None, share, queue_limit, self.clients, arms)
        if current is not None:
            current.stop()

    def arm_agreement(self, model: str) -> dict[str, dict]:
        """Per A/B arm: {"mirrored", "top1_agreement", "max_abs_delta", "compared_with"} over the copies of the
        requests it served that another arm also answered; {} when the arms are not compared."""
        ab = self._ab.get(model)
        if ab is None:
            return {}
        out = {}
        for pair in ab.stats()["pairs"]:
            out[pair["served"]] = {k: pair[k] for k in ("mirrored", "top1_agreement", "max_abs_delta",
                                                        "compared_with")}
        return out

    def stats(self, model: str | None = None) -> dict:
        """{"models": {model: {candidate, share, queue_limit, queued, seen, offered, totals, minutes: [...]}}} for
        every shadowed model (or only `model`). Each minute row: mirrored, top1_agreement, max_abs_delta,
        entity_f1 (NER), served_p50_ms, candidate_p50_ms, candidate_p99_ms, errors, dropped."""
        with self._lock:
            shadows = dict(self._models)
        return {"models": {name: s.stats() for name, s in shadows.items() if model in (None, name)}}

    def close(self) -> None:
        for name in list(self._models):
            self.stop(name)
        with self._lock:
            comparisons, self._ab = list(self._ab.values()), {}
        for comparison in comparisons:
            comparison.stop()
