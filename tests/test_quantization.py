"""Quantization techniques on small real models with real ONNX Runtime sessions (no mocks, no timings).

A random tiny DistilBERT (2 layers, dim 64) with a WordPiece tokenizer trained on SST-2 text is built once per
module; calibration inputs are real SST-2 training sentences preprocessed as served.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from dyngate_build.errors import ConfigError, ExportError
from dyngate_build.techniques import BuildContext, get_technique, make_config
from dyngate_build.techniques.quantization.core import (check_group_size, dequantize_groups, op_counts,
                                                         quantizable_linears, quantize_groups)

QUANTIZATION_TECHNIQUES = ("fp16", "fp16-torchscript", "int8-dynamic", "int8-static", "smoothquant", "zeroquant-w8a8", "zeroquant-w4a8")


def _tiny_checkpoint(folder, data_source, seed=0, outliers=False):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from dyngate_build.data import load_examples
    from dyngate_build.presets import _train_wordpiece, _wrap_tokenizer

    examples, _ = load_examples("text-classification", "train", data_source, limit=3000)
    tokenizer = _train_wordpiece([ex.raw.decode() for ex in examples], vocab_size=2000, lowercase=True,
                                 whitespace_only=False)
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=tokenizer.get_vocab_size(), dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                              max_position_embeddings=128, pad_token_id=tokenizer.token_to_id("[PAD]"),
                              id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = DistilBertForSequenceClassification(config).eval()
    if outliers:  # a few activation channels 40x larger than the rest, as in real LLM/BERT activations
        with torch.no_grad():
            for layer in [model.distilbert.embeddings.LayerNorm] + [l.output_layer_norm for l in
                                                                     model.distilbert.transformer.layer]:
                layer.weight[[3, 17, 40]] *= 40.0
    model.save_pretrained(folder)
    _wrap_tokenizer(tokenizer).save_pretrained(folder)
    return folder


def _context(folder, data_source, tmp_path, calibration=64):
    from dyngate_build.data import load_examples
    from dyngate_build.variant_folder import reference_predictor
    from dyngate_build.sources import load_source

    source = load_source(str(folder), tmp_path / "cache", data_source)
    examples, _ = load_examples("text-classification", "train", data_source, limit=calibration)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return BuildContext(source=source, work_dir=work, calibration=examples, reference=reference_predictor(source, work))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_source):
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny-distilbert"), data_source)


@pytest.fixture(scope="module")
def context(checkpoint, data_source, tmp_path_factory):
    return _context(checkpoint, data_source, tmp_path_factory.mktemp("ctx"))


@pytest.fixture(scope="module")
def dev_feeds(context, data_source):
    from dyngate_build.data import load_examples

    examples, _ = load_examples("text-classification", "dev", data_source, limit=48)
    return context.feeds([ex.raw for ex in examples], batch_size=8)


def _run(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def _errors(path, reference_path, feeds):
    """(max |Δlogit|, mean |Δlogit|, top-1 agreement) of graph `path` against `reference_path`."""
    got, ref = _run(path, feeds), _run(reference_path, feeds)
    diff = np.concatenate([np.abs(g - r).ravel() for g, r in zip(got, ref)])
    top1 = np.mean(np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, ref)]))
    return float(diff.max()), float(diff.mean()), float(top1)


def _apply(context, name, **options):
    return get_technique(name).apply(context, make_config(name, options))


def test_every_quantization_technique_is_registered_and_has_a_case():
    from dyngate_build.techniques import known_techniques

    assert set(QUANTIZATION_TECHNIQUES) <= set(known_techniques())
    assert {f"test_{n.replace('-', '_')}" for n in QUANTIZATION_TECHNIQUES} <= set(globals())


def test_fp16(context, dev_feeds):
    variant = _apply(context, "fp16")
    graph = onnx.load(str(variant.artifact))
    assert sum(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer) > 10
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io types kept
    assert any("GPU" in note for note in variant.notes)
    max_diff, _, top1 = _errors(variant.artifact, context.fp32_onnx(), dev_feeds)
    assert max_diff <= variant.tolerance.max_abs_logit and top1 >= variant.tolerance.min_top1_agreement


def test_fp16_torchscript(context, dev_feeds):
    import torch

    variant = _apply(context, "fp16-torchscript")
    module = torch.jit.load(str(variant.artifact))
    assert {p.dtype for p in module.parameters()} == {torch.float16}  # weights really are half precision
    assert variant.runtime["input_dtype"] == "float16" and any("GPU" in note for note in variant.notes)
    reference = _run(context.fp32_onnx(), dev_feeds)
    with torch.no_grad():
        got = [module(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])).float().numpy()
               for f in dev_feeds]
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, reference))
    top1 = np.mean(np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, reference)]))
    assert diff <= variant.tolerance.max_abs_logit and top1 >= variant.tolerance.min_top1_agreement


def test_int8_dynamic(context, dev_feeds):
    variant = _apply(context, "int8-dynamic")
    counts = op_counts(variant.artifact)
    linears = len(quantizable_linears(context.source.model))
    assert counts["MatMulInteger"] >= linears and counts["DynamicQuantizeLinear"] > 0
    assert counts["DequantizeLinear"] >= 1  # INT8 embedding table, dequantized after the Gather
    assert variant.artifact.stat().st_size < 0.5 * context.fp32_onnx().stat().st_size
    max_diff, _, top1 = _errors(variant.artifact, context.fp32_onnx(), dev_feeds)
    assert max_diff <= variant.tolerance.max_abs_logit and top1 >= variant.tolerance.min_top1_agreement


def _integer_matmul_inputs(path) -> list[tuple]:
    """(activation zero-point dtype, weight dtype, activation scale is a constant) of every MatMulIntegerToFloat
    whose activation comes from a QuantizeLinear."""
    graph = onnx.load(str(path)).graph
    produced = {out: node for node in graph.node for out in node.output}
    constants = {i.name: i for i in graph.initializer}
    pairs = []
    for node in graph.node:
        q = produced.get(node.input[0])
        if node.op_type == "MatMulIntegerToFloat" and q is not None and q.op_type == "QuantizeLinear":
            act_zp, weight = constants[q.input[2]], constants[node.input[1]]
            pairs.append((onnx.helper.tensor_dtype_to_np_dtype(act_zp.data_type),
                          onnx.helper.tensor_dtype_to_np_dtype(weight.data_type), q.input[1] in constants))
    return pairs


def _assert_static_integer_graph(path, model):
    """The static property: no run-time activation statistics (constant scales, no DynamicQuantizeLinear or
    ReduceMax), every weight MatMul an integer U8S8 GEMM with its bias folded in, q/k/v fused into one."""
    counts = op_counts(path)
    linears, layers = len(quantizable_linears(model)), model.config.n_layers
    assert counts["DynamicQuantizeLinear"] == 0 and counts["ReduceMax"] == 0 and counts["QuantizeLinear"] >= 1
    pairs = _integer_matmul_inputs(path)
    assert len(pairs) == linears - 2 * layers and counts["Split"] == layers
    assert set(pairs) == {(np.dtype(np.uint8), np.dtype(np.int8), True)}
    graph = onnx.load(str(path)).graph
    assert all(len(n.input) == 7 and n.input[6] for n in graph.node if n.op_type == "MatMulIntegerToFloat")


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_int8_static(context, dev_feeds, method):
    variant = _apply(context, "int8-static", method=method, samples=16)
    _assert_static_integer_graph(variant.artifact, context.source.model)
    assert variant.params["samples"] == 16 and variant.params["method"] == method
    max_diff, _, top1 = _errors(variant.artifact, context.fp32_onnx(), dev_feeds)
    assert max_diff <= variant.tolerance.max_abs_logit and top1 >= variant.tolerance.min_top1_agreement


def test_smoothquant(context, dev_feeds):
    variant = _apply(context, "smoothquant", samples=32)
    _assert_static_integer_graph(variant.artifact, context.source.model)
    report = variant.report
    tried = report["alpha_logit_mse"]  # α chosen by the smallest quantized logit error on calibration inputs
    assert len(tried) == 3 and tried[f"{variant.params['alpha']:g}"] == min(tried.values())
    assert report["equivalence_relative_error"] <= 1e-4
    layers = sorted(n for g in report["groups"] for n in g["layers"])
    assert layers == sorted(n for n, _ in quantizable_linears(context.source.model))
    qkv = [g for g in report["groups"] if len(g["layers"]) == 3]
    assert len(qkv) == 2 and all(g["layers"][0].endswith("q_lin") for g in qkv)  # q/k/v share one input
    max_diff, _, top1 = _errors(variant.artifact, context.fp32_onnx(), dev_feeds)
    assert max_diff <= variant.tolerance.max_abs_logit and top1 >= variant.tolerance.min_top1_agreement


def test_smoothing_keeps_the_function(context):
    """Smoothing is function-preserving at any α (flattening is checked on planted outliers below: on a model
    without outliers, a group's max/median ratio may move either way)."""
    from dyngate_build.techniques.quantization.smoothquant import prove_equivalent, smooth

    feeds = context.calibration_feeds(16)
    for alpha in (0.0, 0.5, 0.85, 1.0):
        smoothed, groups = smooth(context.source.model, feeds, alpha)
        assert groups and prove_equivalent(context.source.model, smoothed, feeds) <= 1e-4


def test_a_smoothing_that_changes_the_function_is_refused(context):
    from dyngate_build.techniques.quantization.smoothquant import prove_equivalent, smooth

    feeds = context.calibration_feeds(4)
    smoothed, _ = smooth(context.source.model, feeds, 0.5)
    with torch.no_grad():
        smoothed.distilbert.transformer.layer[1].ffn.lin1.inv_scale.mul_(2.0)
    with pytest.raises(ExportError, match="not function-preserving"):
        prove_equivalent(context.source.model, smoothed, feeds)


def test_smoothquant_beats_plain_int8_static_on_planted_outliers(tmp_path, data_source, dev_feeds):
    folder = _tiny_checkpoint(tmp_path / "outliers", data_source, seed=1, outliers=True)
    ctx = _context(folder, data_source, tmp_path)
    static = _apply(ctx, "int8-static", samples=64)
    smooth = _apply(ctx, "smoothquant", samples=64, alpha=0.5)
    # planted 40x channels give max/median ratios of ~300; α=0.5 brings them to ~20 (measured over seeds 1-3)
    before, after = smooth.report["outlier_ratio_before_max"], smooth.report["outlier_ratio_after_max"]
    assert before > 100 and after < before / 8
    feeds = ctx.feeds([b"a gripping , funny and moving film", b"dull and lifeless .",
                       b"the plot is thin but the acting carries it", b"one of the worst movies of the year"], 2)
    _, static_error, _ = _errors(static.artifact, ctx.fp32_onnx(), feeds)
    _, smooth_error, _ = _errors(smooth.artifact, ctx.fp32_onnx(), feeds)
    assert smooth_error < static_error


@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_zeroquant_w4a8(context, dev_feeds, group_size):
    variant = _apply(context, "zeroquant-w4a8", group_size=group_size)
    graph = onnx.load(str(variant.artifact))
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(quantizable_linears(context.source.model))
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == group_size and attrs["accuracy_level"] == 4
    assert op_counts(variant.artifact)["GatherBlockQuantized"] >= 1  # 4-bit embedding table
    assert variant.artifact.stat().st_size < 0.45 * context.fp32_onnx().stat().st_size
    max_diff, _, top1 = _errors(variant.artifact, context.fp32_onnx(), dev_feeds)
    assert max_diff <= variant.tolerance.max_abs_logit and top1 >= variant.tolerance.min_top1_agreement


@pytest.mark.parametrize("kernel", ["tokenwise", "matmulnbits"])
def test_zeroquant_w8a8(context, dev_feeds, kernel):
    variant = _apply(context, "zeroquant-w8a8", kernel=kernel)
    counts = op_counts(variant.artifact)
    linears = len(quantizable_linears(context.source.model))
    if kernel == "tokenwise":  # per-row scales (ReduceMax over the last axis), no per-tensor DynamicQuantizeLinear
        graph = onnx.load(str(variant.artifact)).graph
        layers = context.source.model.config.n_layers
        # q/k/v read one activation: one quantization, one fused GEMM, one Split per layer
        assert counts["MatMulIntegerToFloat"] == linears - 2 * layers and counts["Split"] == layers
        assert counts["DynamicQuantizeLinear"] == 0 and counts["MatMulInteger"] == 0
        consts = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        reduce = [n for n in graph.node if n.op_type == "ReduceMax"]
        assert reduce and all(consts[n.input[1]].tolist() == [-1] for n in reduce)
        weights = {n.input[0]: consts[n.input[1]] for n in graph.node if n.op_type == "MatMulIntegerToFloat"}
        assert all(w.dtype == np.int8 for w in weights.values())
        blocks = {n.input[0]: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                  for n in graph.node if n.op_type == "QuantizeLinear"}
        assert len(blocks) == len(weights)  # one row-wise quantization per activation, one block per row
        quantizer_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
        for codes, w in weights.items():
            attrs = blocks[quantizer_of[codes]]
            assert attrs["axis"] == -1 and attrs["block_size"] == w.shape[0]
        # the embedding tables are INT8 (weight-only, one scale per row): no FP32 table is left
        vocab = context.source.model.config.vocab_size
        tables = [consts[n.input[0]] for n in graph.node if n.op_type == "Gather" and n.input[0] in consts
                  and consts[n.input[0]].ndim == 2 and consts[n.input[0]].shape[1] > 1]
        assert any(t.shape[0] == vocab for t in tables) and all(t.dtype == np.int8 for t in tables)
        dim = context.source.model.config.dim
        assert not any(c.dtype == np.float32 and c.shape == (vocab, dim) for c in consts.values())
    else:
        assert counts["MatMulNBits"] == linears
    max_diff, _, top1 = _errors(variant.artifact, context.fp32_onnx(), dev_feeds)
    assert max_diff <= variant.tolerance.max_abs_logit and top1 >= variant.tolerance.min_top1_agreement


def test_tokenwise_w8a8_all_zero_row_gives_exact_zero(tmp_path):
    """A token row of zeros has row scale 0: its output is exactly 0 (FP32's answer), never NaN."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from dyngate_build.techniques.quantization.zeroquant import tokenwise_w8a8

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 5)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 5])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "f.onnx")
    out = tokenwise_w8a8(tmp_path / "f.onnx", tmp_path / "q.onnx")
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    x[1, 2] = 0.0
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.all(np.isfinite(y)) and np.all(y[1, 2] == 0.0)
    np.testing.assert_allclose(y, x @ weight, atol=0.05 * np.abs(x @ weight).max())


def _alone_and_in_batch(path, context, texts: list[bytes]) -> float:
    """max |Δlogit| between each text run alone and the same text inside one request of all `texts`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = session.run(None, context.feeds(texts, batch_size=len(texts))[0])[0]
    alone = np.concatenate([session.run(None, f)[0] for f in context.feeds(texts, batch_size=1)])
    return float(np.abs(batch - alone).max())


def test_tokenwise_scales_make_answers_independent_of_batch_neighbours(context, data_source):
    """ZeroQuant's token-wise activation scales: a text's logits are the same alone and inside a 32-text request
    (padded to the longest); int8-dynamic's per-tensor scale moves them (the test can fail)."""
    from dyngate_build.data import load_examples

    examples, _ = load_examples("text-classification", "dev", data_source, limit=32)
    texts = [ex.raw for ex in examples]
    assert _alone_and_in_batch(context.fp32_onnx(), context, texts) <= 1e-5
    for name in ("zeroquant-w8a8", "zeroquant-w4a8"):
        assert _alone_and_in_batch(_apply(context, name).artifact, context, texts) <= 1e-4, name
    assert _alone_and_in_batch(_apply(context, "int8-dynamic").artifact, context, texts) > 1e-4


@pytest.mark.parametrize("bits", [8, 4, "ternary", "binary"])
@pytest.mark.parametrize("group_size", [16, 64])
def test_group_quantization_round_trip(bits, group_size):
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    codes, scales = quantize_groups(weight, bits, group_size)
    assert codes.dtype == torch.int8 and scales.shape == (32, 128 // group_size)
    assert set(codes.unique().tolist()) <= ({-1, 0, 1} if bits in ("ternary", "binary")
                                            else set(range(-(2 ** (bits - 1) - 1), 2 ** (bits - 1))))
    restored = dequantize_groups(codes, scales, group_size)
    np.testing.assert_array_equal(quantize_groups(restored, bits, group_size)[0], codes)  # idempotent
    if bits == 8:
        assert float((restored - weight).abs().max()) <= float(scales.max()) / 2 + 1e-6


def test_group_size_must_divide_every_layer(context):
    check_group_size("group_size", 32, context.source.model)
    technique = get_technique("zeroquant-w4a8")
    with pytest.raises(ConfigError, match=r"group_size=128 does not divide layer .*in_features=64"):
        technique.check(context.source, make_config("zeroquant-w4a8", {"group_size": 128}))


@pytest.mark.parametrize("name, options, message", [
    ("smoothquant", {"alpha": 1.5}, r"alpha=1.5 is outside \[0.0, 1.0\]"),
    ("smoothquant", {"alpha": -0.1}, r"alpha=-0.1 is outside"),
    ("zeroquant-w8a8", {"bits": 4}, r"bits=4 is not supported by zeroquant-w8a8"),
    ("zeroquant-w4a8", {"bits": 3}, r"bits=3 is not supported"),
    ("zeroquant-w4a8", {"group_size": 48}, r"group_size=48 is not supported; choose one of: 16, 32"),
    ("zeroquant-w4a8", {"kernel": "cuda"}, r"kernel='cuda' is not supported"),
    ("int8-static", {"method": "kl"}, r"method='kl' is not supported; choose one of: entropy, minmax, percentile"),
    ("int8-static", {"samples": 0}, r"samples=0 must be an integer in \[1, 1024\]"),
    ("int8-dynamic", {"weight_type": "int4"}, r"weight_type='int4' is not supported"),
    ("int8-dynamic", {"calibrate": True}, r"has no option\(s\) calibrate"),
])
def test_bad_options_raise_config_error(name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_config(name, options)


def test_unknown_technique_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"'int3' is unknown; known techniques: .*zeroquant-w4a8"):
        get_technique("int3")


def test_missing_calibration_data_raises_before_any_work(checkpoint, data_source, tmp_path):
    ctx = _context(checkpoint, data_source, tmp_path)
    ctx.calibration = []
    for name in ("int8-static", "smoothquant"):
        with pytest.raises(ConfigError, match="calibration data"):
            _apply(ctx, name)
    assert not any(ctx.work_dir.glob("*.onnx"))  # nothing exported before the check


def test_bad_option_leaves_the_repository_as_it_was(tmp_path, checkpoint, data_dir):
    from dyngate_build.pipeline import BuildOptions, build

    repository = tmp_path / "repo"
    (repository / "keep").mkdir(parents=True)
    (repository / "keep" / "config.pbtxt").write_text('name: "keep"\n')
    before = sorted(p.relative_to(repository) for p in repository.rglob("*"))
    for options in ({"smoothquant": {"alpha": 2.0}}, {"zeroquant-w4a8": {"group_size": 128}}):
        with pytest.raises(ConfigError):
            build(BuildOptions(model=str(checkpoint), techniques=("fp32", *options), technique_options=options,
                               repository=repository, cache_dir=tmp_path / "cache",
                               data=str(data_dir)),
                  log=lambda *a: None)
        assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == before



def test_smoothing_a_linear_that_reads_two_tensors_keeps_the_function():
    """DeBERTa-v2 (share_att_key) calls query_proj/key_proj on the hidden states and on the relative position
    embeddings: each Linear must get one scale (its first group), or the weights are scaled twice."""
    from transformers import DebertaV2Config, DebertaV2ForTokenClassification

    from dyngate_build.techniques.quantization.smoothquant import prove_equivalent, smooth

    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                             position_buckets=8, share_att_key=True, pos_att_type=["p2c", "c2p"],
                             position_biased_input=False, norm_rel_ebd="layer_norm", num_labels=3)
    model = DebertaV2ForTokenClassification(config).eval()
    feeds = [{"input_ids": np.random.default_rng(i).integers(5, 100, (2, 7)).astype(np.int64),
              "attention_mask": np.ones((2, 7), dtype=np.int64)} for i in range(4)]
    smoothed, groups = smooth(model, feeds, 0.5)
    layers = [n for g in groups for n in g["layers"]]
    assert len(layers) == len(set(layers)) == len(quantizable_linears(model))
    assert prove_equivalent(model, smoothed, feeds) <= 1e-4
