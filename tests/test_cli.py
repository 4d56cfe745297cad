"""The `dyngate` command's own checks, run in process: each refuses a bad flag before any work, with one
`error:` line naming the flag, the bad value and what is allowed."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from dyngate_cli import main


def test_version_prints_the_installed_distribution_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"dyngate {version('dyngate')}"


def test_a_misspelt_preset_is_refused_before_any_build_or_network(tmp_path, capsys):
    """Found in a trial: `--model distilbert-tinyy` (or a PRESETS= typo in make) went to the Hugging Face hub and
    failed with a network error. Now every --model is checked first: nothing is built, not even the good one."""
    from dyngate_build.errors import ConfigError
    from dyngate_build.sources import check_location

    repository = tmp_path / "repo"
    code = main(["build", "--model", "distilbert-tiny", "--model", "distilbert-tinyy", "--techniques", "fp32",
                 "--repository", str(repository), "--cache-dir", str(tmp_path / "cache")])
    error = capsys.readouterr().err
    assert code == 2 and not repository.exists() and not (tmp_path / "cache").exists(), error
    assert "model='distilbert-tinyy' is not a known preset (did you mean 'distilbert-tiny'?)" in error
    assert "known presets: deberta-tiny, distilbert-6l, distilbert-tiny, vit-tiny" in error and "PRESETS=" in error
    with pytest.raises(ConfigError):
        check_location("vit-tin")
    # hub ids, with or without an owner, are left to from_pretrained
    assert check_location("distilbert/distilbert-base-uncased") == check_location("distilbert-base-uncased") == "hub"
    assert check_location("deberta-tiny") == "preset"


def test_predict_refuses_an_unknown_request_parameter_before_asking_triton(capsys):
    """Found in a trial: `--param foo=1` was sent along and ignored. Port 9 (discard) has no Triton: the
    parameter's error comes first."""
    code = main(["predict", "--model", "distilbert-tiny", "--text", "a fine film", "--param", "foo=1",
                 "--triton", "127.0.0.1:9"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: --param 'foo=1': 'foo' is no request parameter") and "allowed: exit_threshold" \
        in error, error


def test_recommend_refuses_two_accuracy_targets_for_one_cascade(tmp_path, capsys):
    """Found in a trial: `--cascade A,B --at-least X --budget Y` ignored --budget. A cascade has one target (as
    choose_cascade_threshold takes it), so the pair is refused before the repository is read."""
    code = main(["recommend", "--model", "distilbert-tiny", "--cascade", "int8-dynamic,fp32", "--at-least", "0.8",
                 "--budget", "0.5", "--repository", str(tmp_path / "no-repository")])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: --budget 0.5 and --at-least 0.8 are two accuracy targets; give one"), error


@pytest.mark.parametrize("flags, message", [
    (["--cascade", "int8-dynamic,fp32", "--budget", "-1"], "--budget -1 must be a number of points ≥ 0"),
    (["--budget", "nan"], "--budget nan must be a number of points ≥ 0"),
    (["--cascade", "int8-dynamic,fp32", "--at-least", "80"], "--at-least 80 must be in [0, 1]"),
    (["--budget", "1", "--at-least", "0.8"], "--at-least sets a cascade target: give --cascade"),
])
def test_recommend_names_its_flags_in_their_errors(tmp_path, capsys, flags, message):
    """Found in a new user's trial: the errors named internal fields (within_pt=-1.0, at_least=80.0), and
    --at-least with --budget but no --cascade spoke of two targets instead of the missing --cascade."""
    code = main(["recommend", "--model", "distilbert-tiny", *flags, "--repository", str(tmp_path / "no-repository")])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"error: {message}"), error
