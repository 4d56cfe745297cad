"""The cascade policy's threshold chosen from an accuracy target on the dev split (dyngate_measure.recommend):
the build stores every variant's per-example dev answers (dev_scores.json), the choice simulates the cascade on
them, and the real cascade served by Triton through the Router escalates and answers exactly as predicted.

A real build of distilbert-tiny (early exit and fp32; the less accurate of the two on the dev sample goes first:
presets trained on another machine differ, and on 200 examples early exit has scored above fp32), a real
embedded Triton, no mocks, no timing assertions. The same repository serves the gateway's rule for `exit_threshold`
(read by the early-exit variant only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dyngate_build.data import load_examples
from dyngate_build.errors import ConfigError, RepositoryError
from dyngate_build.metadata import (DEV_SCORES_FILE, DevScores, StaleRepositoryError, VariantMetadata,
                                    metric_from_counts)
from dyngate_build.repository import newest_version_dir, python_variants_by_model
from dyngate_gateway.handlers import ClientPool, load_catalog
from dyngate_gateway.routing import Router, RoutingConfig
from dyngate_measure.recommend import cascade_from_repository, cascade_steps, choose_cascade_threshold
from tests.conftest import ROOT, post_predict, running_gateway, running_triton

MODEL = "distilbert-tiny"
VARIANTS = ("early-exit", "fp32")
EVAL_LIMIT = 200


@pytest.fixture(scope="module")
def repository(tmp_path_factory, preset_checkpoint, cache_dir, data_dir) -> Path:
    from dyngate_build.pipeline import BuildOptions, build

    preset_checkpoint(MODEL)
    repository = tmp_path_factory.mktemp("cascade") / "model_repository"
    build(BuildOptions(model=MODEL, techniques=VARIANTS, repository=repository, cache_dir=cache_dir,
                       data=str(data_dir), eval_limit=EVAL_LIMIT, check_limit=16, latency_samples=5),
          log=lambda *a: None)
    return repository


@pytest.fixture(scope="module")
def order(repository) -> list[str]:
    """The two variants, the less accurate on the stored dev answers first (early exit first on a tie)."""
    steps = cascade_steps(python_variants_by_model(repository, [MODEL])[MODEL], list(VARIANTS))
    alone = {v: metric_from_counts(s.metric, s.hits, s.predicted, s.gold) for v, s in steps}
    return sorted(VARIANTS, key=lambda v: (alone[v], VARIANTS.index(v)))


@pytest.fixture(scope="module")
def steps(repository, order):
    return cascade_steps(python_variants_by_model(repository, [MODEL])[MODEL], order)


def _simulate(steps, threshold: float) -> tuple[float, float]:
    """The cascade on stored dev answers, written out plainly: (metric, share escalating past the first)."""
    picked, escalated = [], 0
    scores = [s for _, s in steps]
    for i in range(scores[0].n):
        k = next((k for k, s in enumerate(scores[:-1]) if s.confidence[i] >= threshold), len(scores) - 1)
        escalated += k > 0
        picked.append((scores[k].hits[i], scores[k].predicted[i], scores[k].gold[i]))
    hits, predicted, gold = zip(*picked)
    return metric_from_counts(scores[0].metric, hits, predicted, gold), escalated / scores[0].n


def test_the_build_stores_every_dev_answer_matching_its_metric(repository, steps):
    for variant, scores in steps:
        folder = repository / f"{MODEL}__{variant}"
        meta = VariantMetadata.load(folder)
        assert (newest_version_dir(folder) / DEV_SCORES_FILE).exists()
        assert scores.n == meta.accuracy.n == EVAL_LIMIT
        assert metric_from_counts(scores.metric, scores.hits, scores.predicted, scores.gold) == \
            pytest.approx(meta.accuracy.value, abs=1e-12)
        assert all(0.0 <= c <= 1.0 for c in scores.confidence)
    assert steps[0][1].examples_sha256 == steps[1][1].examples_sha256


def test_dev_scores_of_every_task_reproduce_its_metric(built_repository):
    """Text classification, image classification and NER (entity F1 from per-sentence span counts)."""
    tasks = set()
    for model, entries in python_variants_by_model(built_repository).items():
        for entry in entries:
            scores = DevScores.load(newest_version_dir(entry.folder))
            meta = entry.metadata
            tasks.add(meta.task)
            assert (scores.metric, scores.n) == (meta.accuracy.name, meta.accuracy.n)
            assert metric_from_counts(scores.metric, scores.hits, scores.predicted, scores.gold) == \
                pytest.approx(meta.accuracy.value, abs=1e-12)
        choice = choose_cascade_threshold(cascade_steps(entries, [e.variant for e in entries]), within_pt=0.0)
        assert choice.threshold is not None and choice.metric >= choice.alone[choice.order[-1]] - 1e-9
    assert tasks == {"text-classification", "image-classification", "token-classification"}


def test_the_threshold_is_the_lowest_that_meets_the_target(steps, order):
    cheap, expensive = order
    alone = {v: metric_from_counts(s.metric, s.hits, s.predicted, s.gold) for v, s in steps}
    if alone[cheap] == alone[expensive]:
        pytest.skip(f"{cheap} and {expensive} score the same on this dev sample: no gap to choose a threshold in")
    gap_pt = (alone[expensive] - alone[cheap]) * 100
    strict = choose_cascade_threshold(steps, within_pt=0.0)
    loose = choose_cascade_threshold(steps, within_pt=gap_pt / 2)
    loosest = choose_cascade_threshold(steps, within_pt=gap_pt + 0.01)
    for choice, within in ((strict, 0.0), (loose, gap_pt / 2), (loosest, gap_pt + 0.01)):
        assert choice.threshold is not None and choice.order == [cheap, expensive]
        metric, share = _simulate(steps, choice.threshold)
        assert (metric, share) == (pytest.approx(choice.metric), pytest.approx(choice.escalation_share))
        assert metric >= alone[expensive] - within / 100 - 1e-9
        # lowest: every stored confidence below it routes the dev split to a metric under the target
        lower = sorted({c for c in steps[0][1].confidence if c < choice.threshold})
        if lower:  # the next lower routing the dev split can see misses the target
            assert _simulate(steps, lower[-1])[0] < alone[expensive] - within / 100 - 1e-9
        assert choice.answered[cheap] == pytest.approx(1 - choice.escalation_share)
    # a looser target never escalates more; here each step is strictly cheaper
    assert loosest.threshold == 0.0 and loosest.escalation_share == 0.0
    assert loosest.metric == pytest.approx(alone[cheap])
    assert 0 < loose.escalation_share <= strict.escalation_share
    assert loose.threshold <= strict.threshold
    assert strict.escalation_share > 0 and strict.threshold > 0
    absolute = choose_cascade_threshold(steps, at_least=alone[expensive])
    assert absolute.threshold == strict.threshold
    impossible = choose_cascade_threshold(steps, at_least=1.0)
    assert impossible.threshold is None and "no cascade threshold" in impossible.explain()
    assert impossible.metric < 1.0


def test_targets_and_mismatched_dev_samples_are_refused(steps, order, repository, tmp_path):
    for bad in ({}, {"within_pt": 0.5, "at_least": 0.8}, {"within_pt": -1.0}, {"within_pt": float("nan")},
                {"at_least": 1.5}):
        with pytest.raises(ConfigError):
            choose_cascade_threshold(steps, **bad)
    with pytest.raises(ConfigError):
        choose_cascade_threshold(steps[:1], within_pt=0.5)
    cheap = steps[0][1]
    fewer = DevScores(cheap.metric, "another-sample", cheap.confidence[:-1], cheap.hits[:-1], cheap.predicted[:-1],
                      cheap.gold[:-1])
    with pytest.raises(ConfigError, match="same dev examples"):
        choose_cascade_threshold([(order[0], fewer), steps[1]], within_pt=0.5)
    with pytest.raises(ConfigError):
        cascade_from_repository(repository, MODEL, [order[0], "no-such-variant"], within_pt=0.5)
    entries = python_variants_by_model(repository, [MODEL])[MODEL]
    (tmp_path / "1").mkdir()
    moved = [type(e)(e.name, tmp_path, e.backend, e.metadata) for e in entries[:1]] + entries[1:]
    with pytest.raises(RepositoryError):  # a version folder without dev scores (built by an older dyngate)
        cascade_steps(moved, [entries[0].variant, entries[1].variant])
    stale = json.loads((newest_version_dir(entries[0].folder) / DEV_SCORES_FILE).read_text())
    (tmp_path / "1" / DEV_SCORES_FILE).write_text(json.dumps({**stale, "schema_version": 0}))
    with pytest.raises(StaleRepositoryError):
        cascade_steps(moved, [entries[0].variant, entries[1].variant])


def test_recommend_cascade_prints_the_threshold_and_escalation(repository, steps, order):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'build'}:{ROOT / 'gateway'}"}
    out = subprocess.run([sys.executable, "-m", "dyngate_cli", "recommend", "--model", MODEL, "--cascade",
                          ",".join(order), "--budget", "0", "--repository", str(repository)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    strict = choose_cascade_threshold(steps, within_pt=0.0)
    assert f"cascade threshold {strict.threshold:.7g}" in out.stdout
    assert f"{strict.escalation_share:.1%} of requests escalate past {order[0]}" in out.stdout


@pytest.fixture(scope="module")
def triton(repository, tmp_path_factory):
    with running_triton(repository, tmp_path_factory.mktemp("cascade-triton") / "triton.log") as server:
        yield server


def test_the_served_cascade_escalates_and_answers_as_chosen(repository, steps, order, data_source, triton):
    choice = choose_cascade_threshold(steps, within_pt=0.0)
    examples, _ = load_examples("text-classification", "dev", data_source, limit=EVAL_LIMIT)
    catalog = load_catalog(repository)
    labels = catalog[MODEL].labels
    router = Router(catalog, ClientPool(triton.endpoints["grpc"]), RoutingConfig(cascade_order={MODEL: order}))
    escalated = correct = 0
    for ex in examples:
        answer = router.route(MODEL, ex.raw.decode(), "cascade", threshold=choice.threshold)
        escalated += len(answer["route"]) > 1
        correct += answer["answer"]["label"] == labels[ex.target]
    assert escalated == round(choice.escalation_share * len(examples))
    assert correct / len(examples) == pytest.approx(choice.metric)


def test_exit_threshold_is_refused_for_a_variant_without_early_exit(repository, triton):
    """Found in a new user's trial: POST /api/predict accepted (and echoed) exit_threshold for fp32, where it does
    nothing. Now a 400 naming the parameter, the variant and the variants that read it, on the JSON route and the
    page (one rule: the router's); a cascade that may escalate from early exit to fp32 still takes it."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    first_ramp = min(VariantMetadata.load(repository / f"{MODEL}__early-exit").params["exit_layers"])
    assert load_catalog(repository)[MODEL].readers("exit_threshold") == ["early-exit"]
    body = {"model": MODEL, "text": "a fine film", "exit_threshold": 0.0}
    with running_gateway(repository, triton,
                         routing=RoutingConfig(cascade_order={MODEL: ["early-exit", "fp32"]})) as gateway:
        status, answer = post_predict(gateway.url, {**body, "variant": "fp32"})
        assert status == 400, answer
        assert answer["error"] == (f"exit_threshold=0.0 does nothing for variant 'fp32' of {MODEL}: it does not read "
                                   f"exit_threshold; the variants of {MODEL} that read it: early-exit; send one of "
                                   f"them as variant, or leave exit_threshold out")
        status, answer = post_predict(gateway.url, {**body, "variant": "early-exit"})
        assert status == 200 and answer["route"][0]["exit_layer"] == first_ramp, answer  # threshold 0: first ramp
        status, answer = post_predict(gateway.url, {**body, "policy": "cascade", "threshold": 1.0})
        assert status == 200, answer
        assert [(s["variant"], s.get("exit_layer")) for s in answer["route"]] == [("early-exit", first_ramp),
                                                                                    ("fp32", None)]
        api = Client(gateway.url, verbose=False)
        with pytest.raises(AppError, match="exit_threshold=0.5 does nothing for variant 'fp32'.*: early-exit;"):
            api.predict(MODEL, "a fine film", None, "variant", "fp32", 1.0, 0.9, "0.5", api_name="/route")


def test_an_unreadable_runtime_file_is_a_json_500_naming_it(repository, triton, tmp_path):
    """The router reads which request parameters a variant takes from its runtime.json: a broken one (a stale or
    hand-edited repository) is the server's fault, a JSON 500 naming the file, never a plain-text 500."""
    import shutil

    copy = tmp_path / "model_repository"
    shutil.copytree(repository, copy, ignore=shutil.ignore_patterns("__pycache__"))
    broken = newest_version_dir(copy / f"{MODEL}__fp32") / "runtime.json"
    broken.write_text("{not json")
    with running_gateway(copy, triton) as gateway:
        status, answer = post_predict(gateway.url, {"model": MODEL, "text": "a fine film", "variant": "fp32",
                                                    "exit_threshold": 0.5})
        assert status == 500 and f"cannot read {broken}" in answer["error"], answer
        status, answer = post_predict(gateway.url, {"model": MODEL, "text": "a fine film", "variant": "fp32"})
        assert status == 200, answer  # without the parameter the runtime file is not read: Triton answers
