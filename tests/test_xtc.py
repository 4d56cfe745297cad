"""XTC (ternary/binary weights, packed storage, in-graph unpacking) on the trained presets, real ONNX Runtime.

No timings. The graph the build serves must compute exactly what the fake-quantized PyTorch model computes,
its packed codes must read back bit-exact, and the file must shrink.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from dyngate_build.errors import ConfigError
from dyngate_build.techniques import BuildContext, get_technique, make_config
from dyngate_build.techniques.quantization.core import op_counts, quantizable_linears, quantize_groups
from dyngate_build.techniques.quantization.xtc import pack_codes, quantize_model, read_packed, unpack_codes

TEXTS = [b"a gripping , funny and moving film", b"dull and lifeless .", b"the plot is thin but the acting carries it",
         b"one of the worst movies of the year", b"Peter Blackburn met EU officials in Brussels on Monday ."]


def _context(name, preset_checkpoint, cache_dir, data_source, tmp_path, calibration=64):
    from dyngate_build.data import load_examples
    from dyngate_build.variant_folder import reference_predictor
    from dyngate_build.sources import load_source

    preset_checkpoint(name)
    source = load_source(name, cache_dir, data_source)
    examples, _ = load_examples(source.family.task, "train", data_source, limit=calibration)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return BuildContext(source=source, work_dir=work, calibration=examples, reference=reference_predictor(source, work))


@pytest.fixture(scope="module")
def context(preset_checkpoint, cache_dir, data_source, tmp_path_factory):
    return _context("distilbert-tiny", preset_checkpoint, cache_dir, data_source, tmp_path_factory.mktemp("xtc"))


def _ort(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def _torch(model, feeds):
    with torch.no_grad():
        return [model(**{k: torch.from_numpy(v) for k, v in f.items()}).logits.numpy() for f in feeds]


def _apply(ctx, **options):
    return get_technique("xtc").apply(ctx, make_config("xtc", options))


@pytest.mark.parametrize("bits", ["ternary", "binary"])
@pytest.mark.parametrize("count", [1, 3, 4, 7, 8, 9, 4096, 4099])
def test_packed_round_trip_is_exact(bits, count):
    rng = np.random.default_rng(count)
    codes = rng.choice([-1, 0, 1] if bits == "ternary" else [-1, 1], size=count).astype(np.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (-(-count // (4 if bits == "ternary" else 8)), 1)
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


def test_pack_refuses_codes_outside_the_alphabet():
    with pytest.raises(ValueError, match="ternary codes"):
        pack_codes(np.array([0, 2]), "ternary")
    with pytest.raises(ValueError, match="binary codes"):
        pack_codes(np.array([1, 0]), "binary")


def test_ternary_graph_equals_the_fake_quantized_model_and_shrinks(context):
    variant = _apply(context, kd=False)
    model = context.source.model
    fake, records = quantize_model(model, "ternary", None, embedding_bits=8)
    feeds = context.feeds(TEXTS, batch_size=3)
    for got, want in zip(_ort(variant.artifact, feeds), _torch(fake, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # every encoder Linear is stored packed, and reads back bit-exact as the TWN codes of the FP32 weight
    linears = dict(quantizable_linears(model))
    packed = read_packed(variant.artifact)
    assert sorted(packed) == sorted(f"{n}.weight" for n in linears) and variant.report["not_found_in_graph"] == []
    for name, (data, scales) in packed.items():
        weight = linears[name[: -len(".weight")]].weight.detach()
        codes, want_scales = quantize_groups(weight, "ternary", None)
        assert data.dtype == np.uint8 and data.size == -(-codes.numel() // 4)  # 2 bits per weight
        np.testing.assert_array_equal(unpack_codes(data, "ternary", codes.numel()).reshape(codes.shape), codes.numpy())
        np.testing.assert_array_equal(scales.reshape(want_scales.shape), want_scales.numpy())
    counts = op_counts(variant.artifact)
    assert counts["BitShift"] == counts["BitwiseAnd"] == len(linears)
    graph = onnx.load(str(variant.artifact)).graph
    assert any(i.data_type == onnx.TensorProto.INT8 and i.dims[0] == model.config.vocab_size
               for i in graph.initializer)  # INT8 embedding table
    # no FP32 copy of an encoder weight or the embedding table is left in the file (the FP32 classifier head
    # may be stored under any exporter-chosen name, transposed or not)
    from onnx import numpy_helper

    stored = [w.detach().numpy() for w in [*(m.weight for m in linears.values()),
                                           model.distilbert.embeddings.word_embeddings.weight]]
    fp32_copies = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                   and any(np.array_equal(numpy_helper.to_array(i), w) or np.array_equal(numpy_helper.to_array(i), w.T)
                           for w in stored if tuple(w.shape) in (tuple(i.dims), tuple(i.dims)[::-1]))]
    assert fp32_copies == []
    fp32_size = context.fp32_onnx().stat().st_size
    assert variant.artifact.stat().st_size < 0.35 * fp32_size
    assert 0.3 < variant.report["zero_fraction"] < 0.6  # TWN threshold 0.7·mean|W| zeroes ~40% of Gaussian weights
    assert variant.tolerance.min_top1_agreement <= 1.0


def test_binary_with_groups_and_fp32_embeddings(context):
    variant = _apply(context, kd=False, bits="binary", group_size=32, embedding_bits=32)
    fake, _ = quantize_model(context.source.model, "binary", 32, embedding_bits=32)
    feeds = context.feeds(TEXTS, batch_size=2)
    for got, want in zip(_ort(variant.artifact, feeds), _torch(fake, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    for name, (data, scales) in read_packed(variant.artifact).items():
        out_features, groups, _ = scales.shape
        assert data.size * 8 == out_features * groups * 32  # 1 bit per weight
    graph = onnx.load(str(variant.artifact)).graph
    assert not any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)  # FP32 embedding tables
    assert variant.params["bits"] == "binary" and variant.params["group_size"] == 32


@pytest.mark.parametrize("preset", ["vit-tiny", "deberta-tiny"])
def test_other_families_pack_every_encoder_linear(preset, preset_checkpoint, cache_dir, data_source, tmp_path):
    ctx = _context(preset, preset_checkpoint, cache_dir, data_source, tmp_path, calibration=8)
    variant = _apply(ctx, kd=False)
    assert not [n for n in variant.report["not_found_in_graph"] if not n.endswith("embeddings.weight")]
    assert len(read_packed(variant.artifact)) == len(quantizable_linears(ctx.source.model))
    fake, _ = quantize_model(ctx.source.model, "ternary", None, embedding_bits=8)
    from dyngate_build.data import load_examples

    examples, _ = load_examples(ctx.source.family.task, "dev", data_source, limit=6)
    feeds = ctx.feeds([ex.raw for ex in examples], batch_size=3)
    for got, want in zip(_ort(variant.artifact, feeds), _torch(fake, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert variant.artifact.stat().st_size < ctx.fp32_onnx().stat().st_size


def test_kd_runs_through_the_training_module(context):
    variant = _apply(context, kd=True, kd_steps=3, kd_samples=32, kd_batch_size=16)
    assert variant.report["kd"]["steps"] == 3 and np.isfinite(variant.report["kd"]["final_loss"])
    assert variant.params["kd"] and variant.params["kd_steps"] == 3
    feeds = context.feeds(TEXTS, batch_size=5)
    got, ref = _ort(variant.artifact, feeds)[0], _ort(context.fp32_onnx(), feeds)[0]
    assert np.isfinite(got).all() and got.shape == ref.shape
    assert not any(hasattr(m, "parametrizations") for m in context.source.model.modules())  # teacher untouched


@pytest.mark.parametrize("options, message", [
    ({"bits": "int2"}, r"bits='int2' is not supported; choose one of: binary, ternary"),
    ({"bits": 2}, r"bits=2 is not supported"),
    ({"group_size": 12}, r"group_size=12 must be a multiple of 8"),
    ({"group_size": 0}, r"group_size=0 must be a multiple of 8"),
    ({"embedding_bits": 4}, r"embedding_bits=4 is not supported; choose one of: 8, 32"),
    ({"kd": "yes"}, r"kd='yes' must be true or false"),
    ({"kd_steps": 0}, r"kd_steps=0 must be an integer >= 1"),
    ({"kd_learning_rate": 2.0}, r"kd_learning_rate=2.0 is outside"),
    ({"alpha": 0.5}, r"has no option\(s\) alpha"),
])
def test_bad_options_raise_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        make_config("xtc", options)


def test_group_size_must_divide_every_encoder_linear(context):
    technique = get_technique("xtc")
    technique.check(context.source, make_config("xtc", {"group_size": 64}))
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide layer .*in_features=128"):
        technique.check(context.source, make_config("xtc", {"group_size": 48}))


def test_bad_group_size_leaves_the_repository_as_it_was(tmp_path, cache_dir, data_dir, preset_checkpoint):
    from dyngate_build.pipeline import BuildOptions, build

    preset_checkpoint("distilbert-tiny")
    repository = tmp_path / "repo"
    (repository / "keep").mkdir(parents=True)
    (repository / "keep" / "config.pbtxt").write_text('name: "keep"\n')
    before = sorted(p.relative_to(repository) for p in repository.rglob("*"))
    with pytest.raises(ConfigError, match="group_size=48 does not divide"):
        build(BuildOptions(model="distilbert-tiny", techniques=("fp32", "xtc"),
                           technique_options={"xtc": {"group_size": 48}}, repository=repository,
                           cache_dir=cache_dir, data=str(data_dir)), log=lambda *a: None)
    assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == before


def test_onnx_runtime_folds_the_unpacking_at_load(context, tmp_path):
    """All unpacking reads only initializers, so ONNX Runtime's constant folding turns it into plain FP32
    weights once per session: the per-request graph is the FP32 one (no per-run unpacking cost)."""
    import onnxruntime as ort

    variant = _apply(context, kd=False)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(variant.artifact), options, providers=["CPUExecutionProvider"])
    counts = op_counts(tmp_path / "optimized.onnx")
    assert not {"BitShift", "BitwiseAnd", "DequantizeLinear"} & set(counts), counts
    assert counts["MatMul"] == op_counts(context.fp32_onnx())["MatMul"]
