"""The build step on real torch / ONNX Runtime: exports agree at any batch and length, bad builds write nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dyngate_build.errors import ConfigError, ExportError, SourceError
from dyngate_build.export import export_onnx, export_torchscript
from dyngate_build.pipeline import BuildOptions, build
from dyngate_build.techniques import TECHNIQUES, Tolerance, Variant, register
from tests.conftest import PRESET_NAMES


def _snapshot(repository: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repository)): p.read_bytes() for p in sorted(repository.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sources(preset_checkpoints, cache_dir, data_source):
    from dyngate_build.sources import load_source

    return {name: load_source(name, cache_dir, data_source) for name in PRESET_NAMES}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_exports_agree_with_pytorch_at_other_batch_and_sequence_sizes(sources, tmp_path, name):
    import onnxruntime as ort

    source = sources[name]
    onnx_path = export_onnx(source.model, source.family, tmp_path / "m.onnx")
    ts = torch.jit.load(str(export_torchscript(source.model, source.family, tmp_path / "m.pt")))
    session = ort.InferenceSession(str(onnx_path))
    shapes = [(1, 1), (1, 5), (3, 17)] if source.family.is_text else [(1,), (5,)]
    for shape in shapes:
        if source.family.is_text:
            ids = torch.randint(5, source.model.config.vocab_size, shape)
            inputs = (ids, torch.ones_like(ids))
        else:
            size = source.model.config.image_size
            inputs = (torch.randn(shape[0], 3, size, size),)
        with torch.no_grad():
            expected = source.model(**dict(zip(source.family.onnx_inputs, inputs))).logits.numpy()
            traced = ts(*inputs).numpy()
        onnx_out = session.run(None, {n: t.numpy() for n, t in zip(source.family.onnx_inputs, inputs)})[0]
        np.testing.assert_allclose(onnx_out, expected, atol=1e-4)
        np.testing.assert_allclose(traced, expected, atol=1e-4)


def test_image_preprocessing_equals_hf_image_processor(preset_checkpoints, data_source, tmp_path):
    """The served runtime resizes and normalises exactly like the checkpoint's ViTImageProcessor."""
    from transformers import AutoImageProcessor

    from dyngate_build.data import load_examples
    from dyngate_build.runtime import ImagePreprocessor, RuntimeSpec
    from dyngate_build.sources import _image_spec

    processor = AutoImageProcessor.from_pretrained(preset_checkpoints["vit-tiny"])
    spec = RuntimeSpec(task="image-classification", client_input="IMAGE", engine="onnxruntime",
                       artifact="-", graph_inputs=["pixel_values"], labels=[], image=_image_spec(processor))
    pre = ImagePreprocessor(spec)
    examples, _ = load_examples("image-classification", "dev", data_source, limit=4)
    images = [pre.decode(ex.raw) for ex in examples]
    ours = pre.pixels(images)
    theirs = processor(images=[im.convert("RGB") for im in images], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_missing_checkpoint_fails_before_writing(tmp_path, cache_dir, data_dir):
    repository = tmp_path / "repo"
    with pytest.raises(SourceError, match="does not exist"):
        build(BuildOptions(model=str(tmp_path / "no-such-checkpoint"), repository=repository,
                           cache_dir=cache_dir, data=str(data_dir)), log=lambda *a: None)
    assert not any(repository.glob("*")) if repository.exists() else True


def test_unreadable_checkpoint_fails_before_writing(tmp_path, cache_dir, data_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(SourceError, match="cannot read the config"):
        build(BuildOptions(model=str(broken), repository=tmp_path / "repo", cache_dir=cache_dir,
                           data=str(data_dir)), log=lambda *a: None)


def test_unknown_technique_and_option_are_refused_before_work(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="known techniques: .*fp32"):
        build(BuildOptions(model="distilbert-tiny", techniques=("fp32", "warp-drive"), repository=tmp_path,
                           cache_dir=cache_dir), log=lambda *a: None)
    with pytest.raises(ConfigError, match="has no option"):
        build(BuildOptions(model="distilbert-tiny", techniques=("fp32",), technique_options={"fp32": {"x": 1}},
                           repository=tmp_path, cache_dir=cache_dir), log=lambda *a: None)


@dataclass(frozen=True)
class _BrokenConfig:
    """A technique whose graph disagrees with the reference (weights perturbed), to test refusal."""


def _broken(context, config):
    """Perturbed copy of the model exported to ONNX; must be refused by the agreement check."""
    import copy

    model = copy.deepcopy(context.source.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    path = export_onnx(model, context.source.family, context.work_dir / "broken.onnx")
    return Variant("broken", "test-broken", {}, "onnxruntime", path, Tolerance(1e-3, 0.99))


def test_variant_that_disagrees_is_refused_and_repository_unchanged(built_repository, tmp_path, cache_dir,
                                                                     data_dir):
    import shutil

    repository = tmp_path / "repo"
    shutil.copytree(built_repository, repository)
    before = _snapshot(repository)
    if "test-broken" not in TECHNIQUES:
        register("test-broken", _BrokenConfig)(_broken)
    try:
        with pytest.raises(ExportError, match="disagrees with the FP32 PyTorch reference"):
            build(BuildOptions(model="distilbert-tiny", techniques=("fp32", "test-broken"), repository=repository,
                               cache_dir=cache_dir, data=str(data_dir), eval_limit=50, latency_samples=2),
                  log=lambda *a: None)
    finally:
        TECHNIQUES.pop("test-broken", None)
    assert _snapshot(repository) == before
    assert not list(tmp_path.glob(".repo.staging-*"))


def test_cli_build_on_a_bad_data_file_prints_one_error_line(tmp_path, cache_dir, preset_checkpoints):
    """A dev example the serving runtime refuses (text over its length limit) is a bad data set: the CLI
    prints one `error: ...` line naming it and exits 2, no traceback, nothing written."""
    import os
    import subprocess
    import sys

    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    rows = ["label\tsentence", "1\ta fine film .", "0\t" + "word " * 5000, "1\tgood ."]
    for split in ("train", "dev"):
        (data / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    repository = tmp_path / "repo"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "build"), str(root / "gateway")])}
    done = subprocess.run([sys.executable, "-m", "dyngate_cli", "build", "--model", "distilbert-tiny",
                           "--techniques", "fp32", "--data", str(data.parent), "--repository", str(repository),
                           "--cache-dir", str(cache_dir)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2, done.stderr
    errors_printed = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors_printed) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "data example 1" in errors_printed[0]
    assert not any(repository.glob("*/config.pbtxt"))


@pytest.mark.parametrize("case", ["repeated technique", "repository is a file", "gateway without repository"])
def test_cli_refuses_bad_settings_before_any_work(tmp_path, case):
    """Found by a new user's trial: each printed a traceback (or went on) instead of one `error:` line."""
    import os
    import subprocess
    import sys

    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    args = {"repeated technique": ["build", "--model", "distilbert-tiny", "--techniques", "fp32,fp32",
                                   "--repository", str(tmp_path / "repo")],
            "repository is a file": ["build", "--model", "distilbert-tiny", "--techniques", "fp32",
                                     "--repository", str(afile)],
            "gateway without repository": ["gateway", "--repository", str(tmp_path / "missing"), "--port", "1"]}[case]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "build"), str(root / "gateway")])}
    done = subprocess.run([sys.executable, "-m", "dyngate_cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "repo").exists()


def test_skip_existing_builds_nothing_when_every_variant_is_built_alike(text_repository, preset_checkpoint, tmp_path,
                                                                       cache_dir):
    """Found in a new user's trial: every `make demo` rebuilt every variant, even into a repository that another
    demo's Triton was serving. `--skip-existing` (make demo) writes nothing when the repository has them all,
    built alike, and says so in one line; a missing variant or other settings mean a build."""
    import dataclasses
    import os
    import shutil
    import subprocess
    import sys

    from dyngate_build.pipeline import not_built_alike
    from dyngate_build.repository import ServingOptions

    repository = tmp_path / "repo"
    shutil.copytree(text_repository, repository)
    before = _snapshot(repository)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "build"), str(root / "gateway")])}
    done = subprocess.run([sys.executable, "-m", "dyngate_cli", "build", "--model", "distilbert-tiny", "--techniques",
                           "fp32,torchscript", "--repository", str(repository), "--cache-dir", str(cache_dir),
                           "--skip-existing"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"distilbert-tiny: fp32, torchscript already built in {repository} from the same source and serving "
        "settings; not rebuilt (`dyngate build` without --skip-existing, or `make build`, rebuilds)"], done.stdout
    assert _snapshot(repository) == before

    alike = BuildOptions(model="distilbert-tiny", techniques=("fp32", "torchscript"), repository=repository)
    assert not_built_alike(alike) == []
    otherwise = {
        "distilbert-tiny: int8-dynamic is not in": dataclasses.replace(alike, techniques=("fp32", "int8-dynamic")),
        "distilbert-tiny: fp32 was built with serving settings": dataclasses.replace(
            alike, serving=ServingOptions(threads=alike.serving.threads + 1)),
        "distilbert-tiny: fp32 was built from distilbert-tiny, not": dataclasses.replace(
            alike, model=str(preset_checkpoint("distilbert-tiny"))),
        "technique options given (torchscript)": dataclasses.replace(
            alike, technique_options={"torchscript": {}}),
    }
    for reason, options in otherwise.items():
        reasons = not_built_alike(options)
        assert reasons and reasons[0].startswith(reason), (reason, reasons)


def test_exports_print_no_library_notes(preset_checkpoint, tmp_path):
    """Found in a trial: `dyngate build` of deberta-tiny printed torch.onnx's "Skipping constant folding for op
    LayerNormalization" and transformers' "`loss_type=None` was set in the config" (torch.jit.trace probing the
    base model's loss_function). Both exports run in a fresh process: transformers warns once per process."""
    import os
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from dyngate_build.sources import load_source; "
              "from dyngate_build.export import export_onnx, export_torchscript; "
              "s = load_source(sys.argv[1], Path(sys.argv[2])); out = Path(sys.argv[2]); "
              "export_onnx(s.model, s.family, out / 'm.onnx'); export_torchscript(s.model, s.family, out / 'm.pt')")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "build"), str(root / "gateway")])}
    done = subprocess.run([sys.executable, "-c", script, str(preset_checkpoint("deberta-tiny")), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.pt").is_file()
    assert "constant folding" not in done.stderr and "loss_type" not in done.stderr, done.stderr
