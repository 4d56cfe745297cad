"""The recommended variant (dyngate_measure.recommend): the rule on hand-made numbers, and `dyngate recommend`
on a built repository (the build's own metadata), no mocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dyngate_build.errors import ConfigError
from dyngate_build.metadata import DevScores
from dyngate_build.repository import newest_version_dir, python_variants_by_model
from dyngate_cli import main as cli_main
from dyngate_measure.recommend import Candidate, build_candidates, recommend, this_machine
from tests.conftest import ROOT

CANDIDATES = [Candidate("fp32", 0.900, 10.0, 100.0), Candidate("int8", 0.895, 6.0, 25.0),
              Candidate("ee", 0.850, 3.0, 100.0), Candidate("pruned", 0.899, 8.0, 60.0),
              Candidate("elsewhere", 0.900, 1.0, 10.0, unusable="measured on another machine")]


def test_fastest_within_budget_and_why():
    rec = recommend(CANDIDATES, "fp32", 1.0)
    assert rec.chosen == "int8"
    assert [v for v, _ in rec.rejected] == ["elsewhere", "ee"]  # the faster ones, fastest first
    assert "5.00 pt below fp32" in dict(rec.rejected)["ee"]
    text = rec.explain()
    assert "recommended: int8" in text and "0.8950" in text and "-0.50 pt" in text and "6.000 ms" in text
    assert "another machine" in text
    assert recommend(CANDIDATES, "fp32", 5.0).chosen == "ee"
    assert recommend(CANDIDATES, "fp32", 0.0).chosen == "fp32"  # only the baseline itself is within 0 pt
    assert recommend(CANDIDATES, "fp32", 0.1).chosen == "pruned"


def test_no_candidate_and_bad_budget():
    rec = recommend([Candidate("fp32", 0.9, None), Candidate("int8", 0.5, 1.0)], "fp32", 1.0)
    assert rec.chosen is None and dict(rec.rejected)["fp32"] == "no latency measured"
    assert "no variant qualifies" in rec.explain()
    with pytest.raises(ConfigError, match="budget=-1"):
        recommend(CANDIDATES, "fp32", -1)
    with pytest.raises(ConfigError, match="no dev accuracy"):
        recommend([Candidate("fp32", None, 1.0)], "fp32", 1.0)


def test_cli_prints_the_choice_from_the_build_metadata(built_repository, capsys):
    entries = python_variants_by_model(Path(built_repository), ["distilbert-tiny"])["distilbert-tiny"]
    base = next(e for e in entries if e.variant == "fp32").metadata.accuracy.value
    within = [e for e in entries if e.metadata.accuracy.value >= base - 0.01 - 1e-9]
    expected = min(within, key=lambda e: e.metadata.latency_in_process.p50_ms)
    code = cli_main(["recommend", "--model", "distilbert-tiny", "--budget", "1.0",
                     "--repository", str(built_repository)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(f"recommended: {expected.variant} — accuracy "
                          f"{expected.metadata.accuracy.value:.4f}")
    assert f"p50 {expected.metadata.latency_in_process.p50_ms:.3f} ms" in out

    assert cli_main(["recommend", "--model", "no-such-model", "--repository", str(built_repository)]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_cli_refuses_a_repeated_cascade_variant_a_missing_folder_and_a_bad_target(built_repository, tmp_path,
                                                                                   capsys):
    """Found by a new user: --cascade A,A was accepted; a missing --repository said only that the model was not
    in it; --at-least out of range said "must be a accuracy"."""
    repository = str(built_repository)
    base = ["recommend", "--model", "distilbert-tiny", "--repository", repository]
    assert cli_main([*base, "--cascade", "fp32,fp32"]) == 2
    err = capsys.readouterr().err
    assert "the cascade order fp32,fp32 names fp32 more than once" in err and "name each variant once" in err
    assert cli_main([*base, "--cascade", "fp32,torchscript", "--at-least", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--at-least 1.5 must be in [0, 1]: the dev metric the cascade must reach" in err and "a accuracy" not in err
    missing = tmp_path / "no-repository"
    assert cli_main(["recommend", "--model", "distilbert-tiny", "--repository", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--repository {str(missing)!r} is not a folder" in err and "dyngate build --model" in err


def test_a_closed_stdout_ends_the_command_quietly(built_repository):
    """Found by a new user: `dyngate recommend ... | head -1` printed a BrokenPipeError traceback. Here the reader
    closes its end before the command writes: the write fails with EPIPE every time."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'build'}:{ROOT / 'gateway'}"}
    process = subprocess.Popen([sys.executable, "-m", "dyngate_cli", "recommend", "--model", "distilbert-tiny",
                                "--repository", str(built_repository)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141  # as a shell reports a program stopped by SIGPIPE
    assert stderr == ""


def test_numbers_from_another_machine_are_not_recommended(built_repository, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(built_repository, repository)
    for folder in repository.glob("distilbert-tiny__*"):
        if folder.name != "distilbert-tiny__fp32":
            path = folder / "metadata.json"
            meta = json.loads(path.read_text())
            meta["machine"] = {"cpu": "some other cpu", "cores": 64}
            path.write_text(json.dumps(meta))
    candidates = _candidates(repository)
    assert candidates["fp32"].unusable is None
    assert all("another machine" in c.unusable for v, c in candidates.items() if v != "fp32")
    assert recommend(list(candidates.values()), "fp32", 100.0).chosen == "fp32"


def test_a_metric_measured_on_fewer_dev_examples_is_not_compared(built_repository, tmp_path, capsys):
    """Found in a trial: a variant built with a smaller --eval-limit beside fp32 was recommended on a Δ that
    compared different dev examples. Here torchscript's metadata reads as such a build (half the examples, a
    higher accuracy, the lowest p50): it must be marked unusable with the reason, and fp32 recommended."""
    repository = tmp_path / "repo"
    shutil.copytree(built_repository, repository)
    path = repository / "distilbert-tiny__torchscript" / "metadata.json"
    meta = json.loads(path.read_text())
    n = json.loads((repository / "distilbert-tiny__fp32" / "metadata.json").read_text())["accuracy"]["n"]
    meta["accuracy"].update(n=n // 2, value=1.0)
    meta["latency_in_process"]["p50_ms"] = 1e-3
    path.write_text(json.dumps(meta))
    candidates = _candidates(repository)
    assert candidates["fp32"].unusable is None
    assert candidates["torchscript"].unusable == (f"accuracy measured on {n // 2} dev examples, fp32's on {n}: "
                                                  "not comparable; rebuild both with the same --eval-limit")
    assert recommend(list(candidates.values()), "fp32", 100.0).chosen == "fp32"

    assert cli_main(["recommend", "--model", "distilbert-tiny", "--budget", "100",
                     "--repository", str(repository)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("recommended: fp32") and f"torchscript: accuracy measured on {n // 2} dev examples" in out


def test_a_metric_measured_on_as_many_other_dev_examples_is_not_compared(built_repository, tmp_path):
    """The build records the dev sample's digest (the one DevScores carries): the same for every variant of one
    build. A variant whose digest differs (another --data with as many examples) is unusable; metadata written
    before the digest was recorded is compared by its count only."""
    repository = tmp_path / "repo"
    shutil.copytree(built_repository, repository)
    fp32 = json.loads((repository / "distilbert-tiny__fp32" / "metadata.json").read_text())["accuracy"]
    path = repository / "distilbert-tiny__torchscript" / "metadata.json"
    meta = json.loads(path.read_text())
    assert len(fp32["examples_sha256"]) == 64 and meta["accuracy"]["examples_sha256"] == fp32["examples_sha256"]
    (entry, *_) = python_variants_by_model(repository, ["distilbert-tiny"])["distilbert-tiny"]
    assert DevScores.load(newest_version_dir(entry.folder)).examples_sha256 == fp32["examples_sha256"]
    meta["accuracy"].update(examples_sha256="0" * 64, value=1.0)
    meta["latency_in_process"]["p50_ms"] = 1e-3
    path.write_text(json.dumps(meta))
    candidates = _candidates(repository)
    assert candidates["fp32"].unusable is None
    assert candidates["torchscript"].unusable.startswith(f"accuracy measured on other dev examples than fp32's "
                                                         f"({fp32['n']} each")
    assert recommend(list(candidates.values()), "fp32", 100.0).chosen == "fp32"

    del meta["accuracy"]["examples_sha256"]  # written by a dyngate that did not record the digest
    path.write_text(json.dumps(meta))
    candidates = _candidates(repository)
    assert candidates["torchscript"].unusable is None


def _candidates(repository: Path) -> dict[str, Candidate]:
    """build_candidates of distilbert-tiny's variants in `repository` on this machine, by variant."""
    entries = python_variants_by_model(repository, ["distilbert-tiny"])["distilbert-tiny"]
    return {c.variant: c for c in build_candidates(entries, this_machine())}


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0])
def test_a_budget_that_is_not_a_finite_number_is_refused(budget):
    with pytest.raises(ConfigError, match="must be a number ≥ 0"):
        recommend([Candidate("fp32", 0.8, 1.0), Candidate("int8-dynamic", 0.8, 0.5)], budget_pt=budget)


def _timed_copy(text_repository: Path, tmp_path: Path, p50_ms: dict[str, float]) -> Path:
    """A copy of `text_repository` whose variants' build p50 (metadata.json) are `p50_ms`."""
    repository = tmp_path / "repo"
    shutil.copytree(text_repository, repository)
    for variant, p50 in p50_ms.items():
        path = repository / f"distilbert-tiny__{variant}" / "metadata.json"
        meta = json.loads(path.read_text())
        meta["latency_in_process"]["p50_ms"] = p50
        path.write_text(json.dumps(meta))
    return repository


def test_a_cascade_target_no_threshold_reaches_is_an_error_naming_the_reachable_value(text_repository, tmp_path,
                                                                                   capsys):
    """Found in a new user's trial: `--cascade A,B --at-least 0.99` printed "no cascade threshold reaches" and
    exited 0. Here torchscript's stored dev answers are made all wrong and all fully confident: no threshold
    escalates them, so the cascade reaches 0 whatever the target; both flags' messages name what to give."""
    repository = _timed_copy(text_repository, tmp_path, {"torchscript": 1.0, "fp32": 2.0})
    version = newest_version_dir(repository / "distilbert-tiny__torchscript")
    scores = DevScores.load(version)
    DevScores(scores.metric, scores.examples_sha256, [1.0] * scores.n, [0] * scores.n, scores.predicted,
              scores.gold).save(version)
    base = ["recommend", "--model", "distilbert-tiny", "--cascade", "torchscript,fp32", "--repository",
            str(repository)]
    assert cli_main([*base, "--at-least", "0.5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: no cascade threshold reaches accuracy ≥ 0.5000"), captured.err
    assert captured.err.rstrip().endswith("the best gives accuracy 0.0000 with 0.0% escalating: give --at-least "
                                          "0.0000 or lower"), captured.err
    fp32 = json.loads((repository / "distilbert-tiny__fp32" / "metadata.json").read_text())["accuracy"]["value"]
    assert cli_main([*base, "--budget", "1"]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"give --budget {fp32 * 100:.2f} or more (points below fp32)"), err
    assert cli_main([*base, "--at-least", "0.50005"]) == 2  # the target as given, not rounded to 4 decimals (trial)
    assert capsys.readouterr().err.startswith("error: no cascade threshold reaches accuracy ≥ 0.50005 on")
    assert cli_main([*base, "--at-least", "0"]) == 0  # reachable: the answer, on stdout
    assert capsys.readouterr().out.startswith("cascade threshold 0: accuracy 0.0000")


def test_a_plain_recommendation_nothing_qualifies_for_is_an_error(text_repository, tmp_path, capsys):
    """The same convention without --cascade: no variant qualifies (here every one measured on another machine)
    exits 2 with the reasons, not 0."""
    repository = tmp_path / "repo"
    shutil.copytree(text_repository, repository)
    for path in repository.glob("distilbert-tiny__*/metadata.json"):
        meta = json.loads(path.read_text())
        meta["machine"] = {"cpu": "some other cpu", "cores": 64}
        path.write_text(json.dumps(meta))
    assert cli_main(["recommend", "--model", "distilbert-tiny", "--repository", str(repository)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: no variant qualifies: none is within 1 pt of fp32")
    assert "fp32: measured on another machine (some other cpu, 64 cores); rebuild it here" in captured.err


def test_a_cascade_named_expensive_first_is_warned_about(text_repository, tmp_path, capsys):
    """Found in a new user's trial: `--cascade fp32,int8-dynamic` (the slower variant first) said nothing. A
    cascade is meant cheapest first; any order is still a valid cascade and p50s are measurements, so it is a
    warning on stderr naming both p50s and the cheapest-first order, and the threshold is still printed."""
    repository = _timed_copy(text_repository, tmp_path, {"fp32": 2.0, "torchscript": 0.5})
    base = ["recommend", "--model", "distilbert-tiny", "--budget", "1", "--repository", str(repository)]
    assert cli_main([*base, "--cascade", "fp32,torchscript"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("warning: the cascade fp32,torchscript asks fp32 (build p50 2.000 ms) before the faster "
                            "torchscript (0.500 ms): a cascade is meant cheapest first (a variant is asked only for "
                            "what the ones before it were not confident about), so here the requests that reach "
                            "fp32 pay for it before the cheaper torchscript; cheapest first by the build's p50: "
                            "--cascade torchscript,fp32\n")
    assert captured.out.startswith("cascade threshold ")
    assert cli_main([*base, "--cascade", "torchscript,fp32"]) == 0
    assert capsys.readouterr().err == ""
