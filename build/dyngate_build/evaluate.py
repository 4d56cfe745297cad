"""Check and measure a variant through the same runtime Triton serves it with (build/dyngate_build/runtime.py).

- `agreement`: max |Δlogit| and top-1 agreement of a variant against the FP32 PyTorch reference on real
  inputs (token tasks compare every real token position).
- `task_metric`: accuracy (classification) or exact-span entity F1 (CoNLL-style, as seqeval computes it).
- `latency`: in-process per-request latency (ms), batch 1, p50/p90/p99 over real inputs.
They answer with the records metadata.json stores (`dyngate_build.metadata`: AgreementRecord, MetricRecord,
LatencyRecord): one type per concept, written as measured.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from dyngate_build import errors
from dyngate_build.metadata import (AgreementRecord, DevScores, LatencyRecord, MetricRecord, dev_sample_digest,
                                    metric_from_counts)
from dyngate_build.runtime import InputError, Predictor, answer_confidence


@contextlib.contextmanager
def torch_threads_kept():
    """Put torch's intra-op thread count back after the block: loading a TorchScript variant sets its served
    threads for the whole process (`runtime.TorchScriptEngine`), and what runs next (training, baselines) should
    keep the process's own."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TorchReferenceEngine:
    """The in-memory HF model behind the runtime's engine interface: `run(feeds) -> {"logits": float32}`."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]):
        self.model = model.eval()
        self.input_names = input_names

    def run(self, feeds: dict[str, np.ndarray], options: dict) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            inputs = {n: torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names}
            return {"logits": self.model(**inputs).logits.float().numpy()}


def run_predictor(predictor: Predictor, raws: list[bytes], batch_size: int = 32, options: dict | None = None):
    """Predictions for `raws` in batches. A runtime InputError here means the data set itself is bad: it is
    raised as `dyngate_build.errors.InputError` (a DyngateError the CLI prints as one `error:` line), naming the
    example."""
    results = []
    for start in range(0, len(raws), batch_size):
        chunk = predictor.predict(raws[start:start + batch_size], options)
        for index, item in enumerate(chunk):
            if isinstance(item, InputError):
                raise errors.InputError(f"data example {start + index} cannot be served: {item}; fix or drop it "
                                        "in the data set (--data)") from item
        results.extend(chunk)
    return results


def agreement(candidate: list, reference: list) -> AgreementRecord:
    """Compare two lists of runtime Predictions item by item (logits [C] or [L, C]): the largest |Δlogit| over
    items and token positions, the share of equal argmax, and n = the number of items."""
    worst, equal, total = 0.0, 0, 0
    for cand, ref in zip(candidate, reference, strict=True):
        a, b = cand.logits, ref.logits
        worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
        top_a, top_b = np.argmax(a, axis=-1), np.argmax(b, axis=-1)
        equal += int(np.sum(top_a == top_b))
        total += int(np.size(top_a))
    return AgreementRecord(max_abs_logit=worst, top1=equal / max(total, 1), n=len(candidate))


def entity_scores(predicted: list[set], gold: list[set]) -> dict:
    """Micro precision, recall and F1 over exact entity spans (type, start, end) per sentence, as seqeval's
    default mode for CoNLL: {"precision", "recall", "f1"}, each in [0, 1]."""
    tp = sum(len(p & g) for p, g in zip(predicted, gold))
    n_pred, n_gold = sum(map(len, predicted)), sum(map(len, gold))
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_f1(predicted: list[set], gold: list[set]) -> float:
    """Micro F1 over exact entity spans (see `entity_scores`)."""
    return entity_scores(predicted, gold)["f1"]


def example_counts(task: str, predictions: list, examples: list, labels: list[str]) -> tuple[list, list, list]:
    """Per example (hits, predicted, gold): classification 1/1/1 when the answer's label is the gold one, else
    0/1/1; token classification the exact entity spans (type, start, end) matched, predicted and gold."""
    if task == "token-classification":
        predicted = [{(e["entity"], e["start"], e["end"]) for e in p.answer["entities"]} for p in predictions]
        gold = [set(map(tuple, ex.target)) for ex in examples]
        return [len(p & g) for p, g in zip(predicted, gold)], [len(p) for p in predicted], [len(g) for g in gold]
    hits = [int(p.answer["label"] == labels[ex.target]) for p, ex in zip(predictions, examples)]
    return hits, [1] * len(hits), [1] * len(hits)


def task_metric(task: str, predictions: list, examples: list, labels: list[str]) -> MetricRecord:
    """Accuracy for classification, entity F1 for token classification, from runtime answers, with the dev sample's
    size and digest."""
    name = "entity_f1" if task == "token-classification" else "accuracy"
    return MetricRecord(name, metric_from_counts(name, *example_counts(task, predictions, examples, labels)),
                        len(examples), dev_sample_digest(ex.raw for ex in examples))


def dev_scores(task: str, predictions: list, examples: list, labels: list[str]) -> DevScores:
    """One variant's DevScores (metadata.py) from its runtime answers on `examples`: per example the confidence
    the gateway's cascade reads and the counts of `example_counts`."""
    hits, predicted, gold = example_counts(task, predictions, examples, labels)
    return DevScores(metric="entity_f1" if task == "token-classification" else "accuracy",
                     examples_sha256=dev_sample_digest(ex.raw for ex in examples),
                     confidence=[answer_confidence(p.answer) for p in predictions],
                     hits=hits, predicted=predicted, gold=gold)


def latency(predictor: Predictor, raws: list[bytes], warmup: int = 5, options: dict | None = None) -> LatencyRecord:
    """Time `predictor.predict([raw])` (preprocessing + graph + answer) once per raw, batch 1, in ms (`threads` left
    None: the caller knows what the predictor was given)."""
    for raw in raws[:warmup]:
        predictor.predict([raw], options)
    times = []
    for raw in raws:
        start = time.perf_counter()
        predictor.predict([raw], options)
        times.append((time.perf_counter() - start) * 1000)
    return summarize_ms(times)


def summarize_ms(times_ms: list[float]) -> LatencyRecord:
    """p50/p90/p99/mean (ms) and n of a list of millisecond timings, as a metadata LatencyRecord (its batch_size 1
    and threads None are the defaults; a caller that timed otherwise and records it sets them)."""
    values = np.asarray(times_ms, dtype=np.float64)
    return LatencyRecord(p50_ms=float(np.percentile(values, 50)), p90_ms=float(np.percentile(values, 90)),
                   p99_ms=float(np.percentile(values, 99)), mean_ms=float(values.mean()), n=len(values))
