"""Early exit: exact at "never exit", real layer skipping, per-sample exit, bad settings, Triton over gRPC.

Unit tests run a random 3-layer DistilBERT (two off-ramps) and a random 3-layer DeBERTa-v2 token classifier
(per-token ramps, sentence-level exit) through the real exports (ONNX segments chained by
runtime.EarlyExitOnnxEngine, scripted TorchScript); the end-to-end tests build the distilbert-tiny and
deberta-tiny presets' early-exit variants with `dyngate build` code, serve them with the embedded Triton and
ask over gRPC with a per-request `exit_threshold`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dyngate_build.techniques.early_exit.onnx_export import export_onnx_segments
from dyngate_build.techniques.early_exit.segments import confidence, predict_with_exit, segment_model
from dyngate_build.techniques.early_exit.torchscript_export import export_torchscript
from dyngate_build import errors
from dyngate_build.errors import ConfigError
from dyngate_build.runtime import EarlyExitOnnxEngine, InputError, RuntimeSpec, TorchScriptEngine
from tests.conftest import running_triton

LAYERS = 3


@pytest.fixture(scope="module")
def model():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=200, dim=32, n_layers=LAYERS, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, num_labels=2)
    return DistilBertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def segments(model):
    seg = segment_model(model, "distilbert")
    torch.manual_seed(1)
    for ramp in seg.ramps.values():  # spread the ramps' confidences so a mid threshold splits a batch
        for p in ramp.parameters():
            p.data.normal_(0, 1.0)
    return seg


@pytest.fixture(scope="module")
def feeds():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, size=(8, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[5, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _spec(artifact: str, engine: str, extra: dict | None = None) -> RuntimeSpec:
    return RuntimeSpec(task="text-classification", client_input="TEXT", engine=engine, artifact=artifact,
                       graph_inputs=["input_ids", "attention_mask"], labels=["negative", "positive"],
                       extra=extra or {})


def _onnx_engine(segments, folder, task: str, spec) -> EarlyExitOnnxEngine:
    """The segments exported as ONNX (default threshold 0.9) and loaded by the serving engine."""
    export_onnx_segments(segments, folder / "early_exit", "max_prob", 0.9, task)
    return EarlyExitOnnxEngine(str(folder), spec("early_exit", "early-exit-onnx"))


def _ts_engine(segments, folder, spec) -> TorchScriptEngine:
    """The segments scripted as TorchScript (default threshold 0.9) and loaded by the serving engine."""
    export_torchscript(segments, folder / "model.pt", "max_prob")
    return TorchScriptEngine(str(folder), spec("model.pt", "torchscript", {"threshold_input": True,
                                                                         "exit_threshold": 0.9}))


@pytest.fixture(scope="module")
def onnx_engine(segments, tmp_path_factory):
    return _onnx_engine(segments, tmp_path_factory.mktemp("ee-onnx"), "text-classification", _spec)


@pytest.fixture(scope="module")
def ts_engine(segments, tmp_path_factory):
    return _ts_engine(segments, tmp_path_factory.mktemp("ee-ts"), _spec)


def _full_logits(model, feeds) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


def _mid_threshold(segments, feeds) -> float:
    """A threshold between the ramp-1 confidences of the batch: some rows exit at layer 1, the rest not."""
    with torch.no_grad():
        hidden = segments.hidden_states({k: torch.from_numpy(v) for k, v in feeds.items()})[0]
        conf = confidence(segments.ramps[1](hidden), "max_prob").numpy()
    return float(np.sort(conf)[len(conf) // 2] - 1e-6)


def test_never_exit_equals_full_model_onnx_and_torchscript(model, onnx_engine, ts_engine, feeds):
    expected = _full_logits(model, feeds)
    onnx_engine.calls.clear()
    for engine in (onnx_engine, ts_engine):
        out = engine.run(feeds, {"exit_threshold": 1.0})
        np.testing.assert_allclose(out["logits"], expected, atol=1e-5)
        assert out["exit_layer"].tolist() == [LAYERS] * len(expected)
    # ramps are not even run at "never exit"
    assert onnx_engine.calls == {"embeddings": 1, "layer_1": 1, "layer_2": 1, "layer_3": 1, "head": 1}
    # thresholds above 1 mean never exit as well
    np.testing.assert_allclose(onnx_engine.run(feeds, {"exit_threshold": 7})["logits"], expected, atol=1e-5)


def test_low_threshold_really_skips_layers(segments, onnx_engine, ts_engine, feeds):
    onnx_engine.calls.clear()
    onnx_engine.rows.clear()
    out = onnx_engine.run(feeds, {"exit_threshold": 0.0})
    assert out["exit_layer"].tolist() == [1] * 8
    assert onnx_engine.calls == {"embeddings": 1, "layer_1": 1, "ramp_1": 1}  # layers 2, 3 and head never run
    reference, _ = predict_with_exit(segments, {k: torch.from_numpy(v) for k, v in feeds.items()}, 0.0)
    np.testing.assert_allclose(out["logits"], reference.numpy(), atol=1e-5)
    ts = ts_engine.run(feeds, {"exit_threshold": 0.0})
    assert ts["exit_layer"].tolist() == [1] * 8
    np.testing.assert_allclose(ts["logits"], reference.numpy(), atol=1e-5)
    # the PyTorch reference counts layer calls the same way
    calls: dict = {}
    predict_with_exit(segments, {k: torch.from_numpy(v) for k, v in feeds.items()}, 0.0, calls=calls)
    assert calls == {"layer_1": 1}


def test_per_sample_exit_in_a_mixed_batch(model, segments, onnx_engine, ts_engine, feeds):
    threshold = _mid_threshold(segments, feeds)
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    ref_logits, ref_exit = predict_with_exit(segments, inputs, threshold)
    assert 0 < int((ref_exit == 1).sum()) < 8, ref_exit  # the batch really splits
    onnx_engine.rows.clear()
    out = onnx_engine.run(feeds, {"exit_threshold": threshold})
    assert out["exit_layer"].tolist() == ref_exit.tolist()
    np.testing.assert_allclose(out["logits"], ref_logits.numpy(), atol=1e-5)
    stayed = int((ref_exit > 1).sum())
    assert onnx_engine.rows["layer_1"] == 8 and onnx_engine.rows["layer_2"] == stayed  # exited rows left
    ts = ts_engine.run(feeds, {"exit_threshold": threshold})
    assert ts["exit_layer"].tolist() == ref_exit.tolist()
    np.testing.assert_allclose(ts["logits"], ref_logits.numpy(), atol=1e-5)
    # rows that went the whole way equal the full model on them, even though their neighbours left
    full = _full_logits(model, feeds)
    rows = (ref_exit == LAYERS).numpy()
    np.testing.assert_allclose(out["logits"][rows], full[rows], atol=1e-5)


def test_default_threshold_and_bad_request_thresholds(onnx_engine, ts_engine, feeds):
    assert onnx_engine.default == 0.9 and ts_engine.default_threshold == 0.9
    for engine in (onnx_engine, ts_engine):
        for bad in (-0.1, "abc", float("nan")):
            with pytest.raises(InputError, match="exit_threshold"):
                engine.run(feeds, {"exit_threshold": bad})


@pytest.mark.parametrize("options,message", [
    ({"exit_layers": (7,)}, "lacks"),
    ({"exit_layers": (3,)}, "lacks"),  # the last layer exits through the model's own head
    ({"threshold": 1.5}, "threshold"),
    ({"grid": (0.5, -1.0)}, "grid"),
    ({"zero_stage": 4}, "zero_stage"),
    ({"criterion": "margin"}, "criterion"),
    ({"training": "both"}, "training='both' is not supported; choose one of: frozen, joint"),
    ({"joint_weights": "uniform"}, "joint_weights='uniform' applies to training='joint' only"),
    ({"backbone_learning_rate": 1e-4}, "backbone_learning_rate=0.0001 applies to training='joint' only"),
    ({"training": "joint", "joint_weights": "linear"}, "joint_weights='linear' is not supported; choose one of: "
                                                        "depth, uniform"),
    ({"training": "joint", "backbone_learning_rate": 0.0}, r"backbone_learning_rate=0.0 is outside \(0.0, 1.0\]"),
    ({"training": "joint", "backbone_learning_rate": "fast"}, "backbone_learning_rate='fast' must be a number"),
])
def test_bad_settings_raise_before_training(model, options, message):
    from dyngate_build.techniques import get_technique, make_config

    with pytest.raises(ConfigError, match=message):
        config = make_config("early-exit", options)
        source = type("S", (), {"model": model, "family": type("F", (), {"model_type": "distilbert"})})
        get_technique("early-exit").check(source, config)


def test_exit_weights_grow_with_depth_and_sum_to_one():
    from dyngate_build.techniques.early_exit.ramps import exit_weights

    assert exit_weights([1, 2, 3], "depth") == pytest.approx({1: 1 / 6, 2: 2 / 6, 3: 3 / 6})
    assert exit_weights([3, 1], "uniform") == pytest.approx({1: 0.5, 3: 0.5})
    with pytest.raises(ConfigError, match="joint_weights='log'"):
        exit_weights([1, 2], "log")


def _train_small(model, feeds, training: str):
    """Segments of `model` with ramps trained on 4 small labelled batches (a few steps) in `training` mode."""
    from dyngate_build.techniques.early_exit.ramps import train_ramps
    from dyngate_build.training import TrainingConfig

    segments = segment_model(model, "distilbert")
    rng = np.random.default_rng(2)
    batches = [{k: v[rng.permutation(8)] for k, v in feeds.items()} for _ in range(4)]
    labels = [int(i % 2) for b in batches for i in b["input_ids"][:, 1]]
    report = train_ramps(segments, batches, labels, TrainingConfig(micro_batch_size=8, learning_rate=1e-2, epochs=2.0,
                                                                   log_every=10**6),
                         training, **({"joint_weights": "depth", "backbone_learning_rate": 1e-3}
                                      if training == "joint" else {}))
    return segments, report


def test_joint_training_changes_the_backbone_frozen_does_not(model, feeds, tmp_path):
    source_state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen, frozen_report = _train_small(model, feeds, "frozen")
    joint, joint_report = _train_small(model, feeds, "joint")
    assert frozen_report["backbone"] == "frozen" and "weights" not in frozen_report
    assert joint_report["backbone"] == "joint" and joint_report["weights"] == pytest.approx(
        {"1": 1 / 6, "2": 2 / 6, "3": 0.5}, abs=1e-4)

    def backbone(segments):
        return [p for m in (segments.embed, *segments.layers, segments.head) for p in m.parameters()]

    source = segment_model(model, "distilbert")
    moved = [float((a - b).abs().max()) for a, b in zip(backbone(joint), backbone(source))]
    assert all(m == 0.0 for m in (float((a - b).abs().max()) for a, b in zip(backbone(frozen), backbone(source))))
    assert min(moved[1:]) > 0  # every layer and the head moved (embeddings too, bar untouched rows)
    assert not any(p.requires_grad for p in backbone(joint))  # frozen again after training
    # the source model itself is never touched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source_state.items())

    # the jointly trained variant at never-exit is its own full model, not the source
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    own = joint.full_logits(inputs).numpy()
    assert np.abs(own - _full_logits(model, feeds)).max() > 1e-3
    export_onnx_segments(joint, tmp_path / "early_exit", "max_prob", 0.9, "text-classification")
    export_torchscript(joint, tmp_path / "model.pt", "max_prob")
    engines = [EarlyExitOnnxEngine(str(tmp_path), _spec("early_exit", "early-exit-onnx")),
               TorchScriptEngine(str(tmp_path), _spec("model.pt", "torchscript", {"threshold_input": True}))]
    for engine in engines:
        out = engine.run(feeds, {"exit_threshold": 1.0})
        np.testing.assert_allclose(out["logits"], own, atol=1e-5)
        assert out["exit_layer"].tolist() == [LAYERS] * 8
        reference, exits = predict_with_exit(joint, inputs, 0.0)
        low = engine.run(feeds, {"exit_threshold": 0.0})
        assert low["exit_layer"].tolist() == exits.tolist() == [1] * 8
        np.testing.assert_allclose(low["logits"], reference.numpy(), atol=1e-5)


def test_joint_training_runs_for_token_and_image_families(ner_model, ner_feeds):
    """The joint loop is shared: per-token ramps (DeBERTa NER) and ViT train their backbone too."""
    from transformers import ViTConfig, ViTForImageClassification

    from dyngate_build.techniques.early_exit.ramps import train_ramps
    from dyngate_build.training import TrainingConfig

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=LAYERS,
                                              num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    pixels = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    ner_labels = [[int(t) % len(NER_LABELS) for t in ids[:int(m.sum())]]
                  for ids, m in zip(ner_feeds["input_ids"], ner_feeds["attention_mask"])]
    cases = [(ner_model, "deberta-v2", ner_feeds, ner_labels),
             (vit, "vit", {"pixel_values": pixels}, [0, 1, 2, 0, 1, 2, 0, 1])]
    for model, model_type, feed, labels in cases:
        segments = segment_model(model, model_type)
        before = [p.clone() for p in segments.layers[0].parameters()]
        report = train_ramps(segments, [feed], labels, TrainingConfig(micro_batch_size=8, learning_rate=1e-2,
                                                                      max_steps=3, log_every=10**6),
                             "joint", joint_weights="uniform", backbone_learning_rate=1e-3)
        assert report["backbone"] == "joint" and report["steps"] == 3
        assert ("tokens" in report) == (model_type == "deberta-v2")  # per-token labels
        assert report["weights"] == pytest.approx({"1": 1 / 3, "2": 1 / 3, "3": 1 / 3}, abs=1e-4)
        assert any(not torch.equal(a, b) for a, b in zip(before, segments.layers[0].parameters()))
        inputs = {k: torch.from_numpy(v) for k, v in feed.items()}
        out, exits = predict_with_exit(segments, inputs, 1.0)
        assert exits.tolist() == [LAYERS] * 8
        torch.testing.assert_close(out, segments.full_logits(inputs))


def test_unsupported_family_and_checkpoint_are_named(ner_model):
    from dyngate_build.techniques.early_exit.segments import check_family, check_model

    with pytest.raises(ConfigError, match="deberta-v2; 'bert'"):
        check_family("bert")
    check_model(ner_model, "deberta-v2")
    conv = type("M", (), {"config": type("C", (), {"relative_attention": True, "conv_kernel_size": 3})()})()
    with pytest.raises(ConfigError, match="conv_kernel_size=3"):
        check_model(conv, "deberta-v2")


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def early_exit_repository(preset_checkpoint, cache_dir, data_source, tmp_path_factory):
    from dyngate_build.pipeline import BuildOptions, build

    preset_checkpoint("distilbert-tiny")
    repository = tmp_path_factory.mktemp("ee-repo")
    options = BuildOptions(model="distilbert-tiny", techniques=("early-exit", "early-exit-torchscript"),
                           repository=repository, cache_dir=cache_dir, data=data_source.location,
                           eval_limit=200, check_limit=32, latency_samples=20, native=False,
                           technique_options={"early-exit": {"epochs": 5.0, "latency_samples": 16},
                                              "early-exit-torchscript": {"epochs": 5.0, "latency_samples": 16}})
    reports = build(options, log=lambda *_: None)
    return repository, reports


def test_build_records_curve_and_default(early_exit_repository):
    repository, reports = early_exit_repository
    for report in reports:
        meta = json.loads((repository / report.triton_name / "metadata.json").read_text())
        tr = meta["technique_report"]
        assert [row["threshold"] for row in tr["curve"]] == sorted(row["threshold"] for row in tr["curve"])
        full = tr["curve"][-1]
        assert full["threshold"] == 1.0 and full["mean_layers"] == tr["layers"]
        assert tr["at_default"]["accuracy"] >= full["accuracy"] - 0.01 - 1e-9
        assert all(set(row) >= {"accuracy", "mean_layers", "p50_ms"} for row in tr["curve"])
        assert meta["agreement"]["max_abs_logit"] < 1e-3  # checked at never-exit


@pytest.fixture(scope="module")
def joint_repository(preset_checkpoint, cache_dir, data_source, tmp_path_factory):
    from dyngate_build.pipeline import BuildOptions, build

    preset_checkpoint("distilbert-tiny")
    repository = tmp_path_factory.mktemp("ee-joint-repo")
    settings = {"training": "joint", "epochs": 2.0, "latency_samples": 8, "grid": (0.6, 0.9, 1.0)}
    options = BuildOptions(model="distilbert-tiny", techniques=("early-exit",), repository=repository,
                           cache_dir=cache_dir, data=data_source.location, eval_limit=120, check_limit=32,
                           latency_samples=8, native=False, technique_options={"early-exit": settings})
    reports = build(options, log=lambda *_: None)
    return repository, reports


def test_joint_build_records_its_own_full_model_and_loose_agreement(joint_repository):
    from dyngate_build.techniques.early_exit.api import DEFAULT_BACKBONE_LR, JOINT_TOLERANCE, OWN_MODEL_MAX_ABS_LOGIT

    repository, (report,) = joint_repository
    meta = json.loads((repository / report.triton_name / "metadata.json").read_text())
    tr = meta["technique_report"]
    assert meta["params"]["training"] == "joint" and meta["params"]["joint_weights"] == "depth"
    assert meta["params"]["backbone_learning_rate"] == DEFAULT_BACKBONE_LR
    assert tr["ramp_training"]["backbone"] == "joint"
    assert tr["ramp_training"]["weights"] == pytest.approx({"1": 1 / 3, "2": 2 / 3}, abs=1e-4)
    assert meta["tolerance"]["min_top1_agreement"] == JOINT_TOLERANCE.min_top1_agreement
    assert meta["agreement"]["top1"] >= JOINT_TOLERANCE.min_top1_agreement
    # at threshold 1.0 the export equals its own (jointly trained) full model ...
    assert tr["joint"]["own_full_model_max_abs_logit"] < OWN_MODEL_MAX_ABS_LOGIT
    # ... whose accuracy is the curve's threshold-1.0 point, beside the source model's on the same examples
    full = tr["curve"][-1]
    assert full["threshold"] == 1.0 and full["mean_layers"] == 2
    assert tr["joint"]["full_accuracy_after_joint"] == full["accuracy"] == tr["at_default"]["full_accuracy"]
    assert 0.5 < tr["joint"]["source_accuracy"] <= 1.0
    # the default threshold is held to the source model, not to the (possibly weaker) jointly trained one
    assert "source (FP32) model" in tr["rule"]
    assert (tr["default_threshold"] == 1.0
            or tr["at_default"]["accuracy"] >= tr["joint"]["source_accuracy"] - 0.01 - 1e-9)
    assert any("joint training" in note for note in meta["notes"])


@pytest.mark.parametrize("variant", ["early-exit", "early-exit-torchscript"])
def test_triton_serves_early_exit_with_per_request_threshold(early_exit_repository, data_source, variant,
                                                             tmp_path):
    from dyngate_build.data import load_examples
    from dyngate_build.repository import triton_name
    from dyngate_serving.client import TritonClient
    repository, _ = early_exit_repository
    name = triton_name("distilbert-tiny", variant)
    examples, _ = load_examples("text-classification", "dev", data_source, limit=6)
    from dyngate_build.runtime import Predictor

    local = Predictor(str(repository / name / "1"))
    with running_triton(repository, tmp_path / "triton.log", models=[name]) as server:
        client = TritonClient(server.endpoints["grpc"], protocol="grpc")
        for example in examples:
            never = client.predict(name, example.raw, params={"exit_threshold": 1.0})
            expected = local.predict([example.raw], {"exit_threshold": 1.0})[0]
            assert never.answer["exit_layer"] == 2
            np.testing.assert_allclose(never.logits.reshape(-1), expected.logits, atol=1e-5)
            always = client.predict(name, example.raw, params={"exit_threshold": 0.0})
            assert always.answer["exit_layer"] == 1
            default = client.predict(name, example.raw)
            assert default.answer["exit_layer"] in (1, 2)
        with pytest.raises(errors.InputError, match="exit_threshold"):
            client.predict(name, examples[0].raw, params={"exit_threshold": -1.0})
        assert client.predict(name, examples[0].raw).answer["label"]


# ---------------------------------------------------------------------------------------------- DeBERTa NER
# A random 3-layer DeBERTa-v2 token classifier shaped like the deberta-tiny preset (relative attention with
# log buckets, c2p+p2c, shared keys): per-token ramps, a sentence exits when every real token is confident.

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]


@pytest.fixture(scope="module")
def ner_model():
    from transformers import DebertaV2Config, DebertaV2ForTokenClassification

    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=200, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                             position_buckets=8, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                             position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
                             type_vocab_size=0, num_labels=len(NER_LABELS))
    return DebertaV2ForTokenClassification(config).eval()


@pytest.fixture(scope="module")
def ner_segments(ner_model):
    seg = segment_model(ner_model, "deberta-v2")
    torch.manual_seed(3)
    for ramp in seg.ramps.values():  # confident ramps with spread confidences, so a mid threshold splits
        for p in ramp.parameters():
            p.data.normal_(0, 2.0)
    return seg


@pytest.fixture(scope="module")
def ner_feeds():
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 200, size=(8, 14)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, 9:] = 0
    mask[6, 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _ner_spec(artifact: str, engine: str, extra: dict | None = None) -> RuntimeSpec:
    return RuntimeSpec(task="token-classification", client_input="TEXT", engine=engine, artifact=artifact,
                       graph_inputs=["input_ids", "attention_mask"], labels=NER_LABELS, extra=extra or {})


@pytest.fixture(scope="module")
def ner_onnx(ner_segments, tmp_path_factory):
    return _onnx_engine(ner_segments, tmp_path_factory.mktemp("ee-ner-onnx"), "token-classification", _ner_spec)


@pytest.fixture(scope="module")
def ner_ts(ner_segments, tmp_path_factory):
    return _ts_engine(ner_segments, tmp_path_factory.mktemp("ee-ner-ts"), _ner_spec)


def _ner_inputs(feeds):
    return {k: torch.from_numpy(v) for k, v in feeds.items()}


def _real(feeds, logits):
    """Logits at real tokens only (padding positions carry no answer)."""
    return logits[feeds["attention_mask"].astype(bool)]


def test_ner_segments_pass_mask_and_relative_positions(ner_segments, ner_onnx):
    import onnxruntime  # noqa: F401  (the engine's sessions)

    assert ner_segments.token_level and ner_segments.embed_inputs == ("input_ids", "attention_mask")
    assert ner_segments.layer_inputs == ("hidden", "extended_mask", "relative_pos", "rel_embeddings")
    names = {name: [i.name for i in s.get_inputs()] for name, s in ner_onnx.sessions.items()}
    assert names["embeddings"] == ["input_ids", "attention_mask"]
    assert names["layer_2"] == ["hidden", "extended_mask", "relative_pos", "rel_embeddings"]
    assert [o.name for o in ner_onnx.sessions["embeddings"].get_outputs()] == [
        "hidden", "extended_mask", "relative_pos", "rel_embeddings"]
    assert ner_onnx.shared == {"relative_pos", "rel_embeddings"} and ner_onnx.token_level


def test_ner_never_exit_equals_full_model(ner_model, ner_onnx, ner_ts, ner_feeds):
    expected = _full_logits(ner_model, ner_feeds)
    ner_onnx.calls.clear()
    for engine in (ner_onnx, ner_ts):
        out = engine.run(ner_feeds, {"exit_threshold": 1.0})
        assert out["logits"].shape == expected.shape  # [B, L, C]
        np.testing.assert_allclose(_real(ner_feeds, out["logits"]), _real(ner_feeds, expected), atol=1e-5)
        assert out["exit_layer"].tolist() == [LAYERS] * len(expected)
    assert ner_onnx.calls == {"embeddings": 1, "layer_1": 1, "layer_2": 1, "layer_3": 1, "head": 1}


def test_ner_low_threshold_really_skips_layers(ner_segments, ner_onnx, ner_ts, ner_feeds):
    ner_onnx.calls.clear()
    out = ner_onnx.run(ner_feeds, {"exit_threshold": 0.0})
    assert out["exit_layer"].tolist() == [1] * 8
    assert ner_onnx.calls == {"embeddings": 1, "layer_1": 1, "ramp_1": 1}
    calls: dict = {}
    reference, _ = predict_with_exit(ner_segments, _ner_inputs(ner_feeds), 0.0, calls=calls)
    assert calls == {"layer_1": 1}
    np.testing.assert_allclose(out["logits"], reference.numpy(), atol=1e-5)
    ts = ner_ts.run(ner_feeds, {"exit_threshold": 0.0})
    assert ts["exit_layer"].tolist() == [1] * 8
    np.testing.assert_allclose(ts["logits"], reference.numpy(), atol=1e-5)


def test_ner_sentence_exits_when_every_real_token_is_confident(ner_model, ner_segments, ner_onnx, ner_ts,
                                                               ner_feeds):
    from dyngate_build.techniques.early_exit.segments import sentence_confidence

    inputs = _ner_inputs(ner_feeds)
    with torch.no_grad():
        logits = ner_segments.ramps[1](ner_segments.hidden_states(inputs)[0])
    per_token = confidence(logits, "max_prob").numpy()
    mask = ner_feeds["attention_mask"].astype(bool)
    sentence = sentence_confidence(logits, inputs["attention_mask"], "max_prob").numpy()
    np.testing.assert_allclose(sentence, [per_token[r][mask[r]].min() for r in range(8)], rtol=1e-6)
    # padding is ignored: uniform (least confident) logits at padded positions change nothing
    flat = logits.clone()
    flat[~inputs["attention_mask"].bool()] = 0.0
    np.testing.assert_array_equal(sentence_confidence(flat, inputs["attention_mask"], "max_prob").numpy(), sentence)
    threshold = float(np.sort(sentence)[4] - 1e-6)  # about half the sentences exit at layer 1
    ref_logits, ref_exit = predict_with_exit(ner_segments, inputs, threshold)
    assert (ref_exit == 1).tolist() == [bool(s >= threshold) for s in sentence]  # the rest may leave at ramp 2
    assert 0 < int((ref_exit == 1).sum()) < 8
    ner_onnx.rows.clear()
    for engine in (ner_onnx, ner_ts):
        out = engine.run(ner_feeds, {"exit_threshold": threshold})
        assert out["exit_layer"].tolist() == ref_exit.tolist()
        np.testing.assert_allclose(_real(ner_feeds, out["logits"]), _real(ner_feeds, ref_logits.numpy()),
                                   atol=1e-5)
    stayed = int((ref_exit > 1).sum())
    assert ner_onnx.rows["layer_1"] == 8 and ner_onnx.rows["layer_2"] == stayed
    # sentences that went the whole way equal the full model on them, though their neighbours left
    full = _full_logits(ner_model, ner_feeds)
    for row in np.where(ref_exit.numpy() == LAYERS)[0]:
        np.testing.assert_allclose(out["logits"][row][mask[row]], full[row][mask[row]], atol=1e-5)


def test_token_labels_from_spans():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from dyngate_build.techniques.early_exit.ramps import token_labels

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "Peter": 3, "Black": 4, "##burn": 5, "works": 6, "at": 7,
             "EU": 8}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    text = "Peter Blackburn works at EU"
    encoding = tokenizer.encode(text)
    assert encoding.tokens == ["[CLS]", "Peter", "Black", "##burn", "works", "at", "EU", "[SEP]"]
    ids = token_labels(encoding, [("PER", 0, 15), ("ORG", 25, 27)], NER_LABELS)
    assert [NER_LABELS[i] for i in ids] == ["O", "B-PER", "I-PER", "I-PER", "O", "O", "B-ORG", "O"]
    with pytest.raises(ConfigError, match="B-LOC"):
        token_labels(encoding, [("LOC", 0, 5)], NER_LABELS)



# ---------------------------------------------------------------------------------------------- every family

FAMILY_CASES = {"distilbert": "test_per_sample_exit_in_a_mixed_batch",
                "deberta-v2": "test_ner_sentence_exits_when_every_real_token_is_confident",
                "vit": "test_vit_exports_equal_full_model_and_exit"}


def test_every_cut_family_has_a_case():
    from dyngate_build.techniques.early_exit.segments import cut_families

    assert set(cut_families()) == set(FAMILY_CASES)
    assert all(callable(globals()[name]) for name in FAMILY_CASES.values())


def test_vit_exports_equal_full_model_and_exit(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    model = ViTForImageClassification(config).eval()
    seg = segment_model(model, "vit")
    for ramp in seg.ramps.values():
        for p in ramp.parameters():
            p.data.normal_(0, 1.0)
    export_onnx_segments(seg, tmp_path / "early_exit", "entropy", 0.9, "image-classification")
    export_torchscript(seg, tmp_path / "model.pt", "entropy")
    spec = dict(task="image-classification", client_input="IMAGE", graph_inputs=["pixel_values"],
                labels=["a", "b", "c"])
    onnx_engine = EarlyExitOnnxEngine(str(tmp_path), RuntimeSpec(engine="early-exit-onnx", artifact="early_exit",
                                                                 **spec))
    ts_engine = TorchScriptEngine(str(tmp_path), RuntimeSpec(engine="torchscript", artifact="model.pt",
                                                             extra={"threshold_input": True}, **spec))
    pixels = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        full = model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    ref_logits, ref_exit = predict_with_exit(seg, {"pixel_values": torch.from_numpy(pixels)}, 0.5, "entropy")
    for engine in (onnx_engine, ts_engine):
        np.testing.assert_allclose(engine.run({"pixel_values": pixels}, {"exit_threshold": 1.0})["logits"], full,
                                   atol=1e-5)
        out = engine.run({"pixel_values": pixels}, {"exit_threshold": 0.5})
        assert out["exit_layer"].tolist() == ref_exit.tolist()
        np.testing.assert_allclose(out["logits"], ref_logits.numpy(), atol=1e-5)
        assert engine.run({"pixel_values": pixels}, {"exit_threshold": 0.0})["exit_layer"].tolist() == [1] * 5


# ---------------------------------------------------------------------------------------------- DeBERTa end to end

@pytest.fixture(scope="module")
def ner_repository(preset_checkpoint, cache_dir, data_source, tmp_path_factory):
    from dyngate_build.pipeline import BuildOptions, build

    preset_checkpoint("deberta-tiny")
    repository = tmp_path_factory.mktemp("ee-ner-repo")
    settings = {"epochs": 5.0, "latency_samples": 16, "grid": (0.5, 0.7, 0.9, 1.0)}
    options = BuildOptions(model="deberta-tiny", techniques=("early-exit", "early-exit-torchscript"),
                           repository=repository, cache_dir=cache_dir, data=data_source.location,
                           eval_limit=200, check_limit=32, latency_samples=20, native=False,
                           technique_options={"early-exit": dict(settings), "early-exit-torchscript": dict(settings)})
    reports = build(options, log=lambda *_: None)
    return repository, reports


def test_ner_build_records_f1_curve_and_default(ner_repository):
    repository, reports = ner_repository
    assert [r.variant for r in reports] == ["early-exit", "early-exit-torchscript"]
    for report in reports:
        meta = json.loads((repository / report.triton_name / "metadata.json").read_text())
        tr = meta["technique_report"]
        assert tr["metric"] == "entity_f1" and tr["layers"] == 2 and tr["exit_layers"] == [1]
        assert [row["threshold"] for row in tr["curve"]] == [0.5, 0.7, 0.9, 1.0]
        assert all(set(row) >= {"entity_f1", "mean_layers", "p50_ms", "exits"} for row in tr["curve"])
        full = tr["curve"][-1]
        assert full["mean_layers"] == 2 and full["entity_f1"] > 0.5  # the preset's F1 is ~0.86
        at = tr["at_default"]
        assert at["full_entity_f1"] == full["entity_f1"] and at["entity_f1"] >= full["entity_f1"] - 0.01 - 1e-9
        assert tr["ramp_training"]["tokens"] > tr["ramp_training"]["examples"]  # per-token labels
        assert meta["agreement"]["max_abs_logit"] < 1e-3  # checked at never-exit
        assert meta["accuracy"]["name"] == "entity_f1"
    # the ramps are shared by both flavours, so both draw the same curve
    curves = [json.loads((repository / r.triton_name / "metadata.json").read_text())["technique_report"]["curve"]
              for r in reports]
    assert [row["entity_f1"] for row in curves[0]] == pytest.approx([row["entity_f1"] for row in curves[1]], abs=0.005)


@pytest.mark.parametrize("variant", ["early-exit", "early-exit-torchscript"])
def test_triton_serves_ner_early_exit_with_per_request_threshold(ner_repository, data_source, variant, tmp_path):
    from dyngate_build.data import load_examples
    from dyngate_build.repository import triton_name
    from dyngate_build.runtime import Predictor
    from dyngate_serving.client import TritonClient

    repository, _ = ner_repository
    name = triton_name("deberta-tiny", variant)
    examples, _ = load_examples("token-classification", "dev", data_source, limit=6)
    local = Predictor(str(repository / name / "1"))
    with running_triton(repository, tmp_path / "triton.log", models=[name]) as server:
        client = TritonClient(server.endpoints["grpc"], protocol="grpc")
        for example in examples:
            for threshold, layer in ((1.0, 2), (0.0, 1)):
                got = client.predict(name, example.raw, params={"exit_threshold": threshold})
                expected = local.predict([example.raw], {"exit_threshold": threshold})[0]
                assert got.answer["exit_layer"] == layer
                spans = [(e["entity"], e["start"], e["end"], e["text"]) for e in got.answer["entities"]]
                assert spans == [(e["entity"], e["start"], e["end"], e["text"]) for e in expected.answer["entities"]]
                assert [e["score"] for e in got.answer["entities"]] == pytest.approx(
                    [e["score"] for e in expected.answer["entities"]], abs=1e-5)
                np.testing.assert_allclose(got.logits.reshape(expected.logits.shape), expected.logits, atol=1e-5)
                text = example.raw.decode()
                assert all(text[e["start"]:e["end"]] == e["text"] for e in got.answer["entities"])
            assert client.predict(name, example.raw).answer["exit_layer"] in (1, 2)
        # at never-exit the answers are the full model's entities
        full = [client.predict(name, ex.raw, params={"exit_threshold": 1.0}).answer["entities"] for ex in examples]
        assert any(full)  # CoNLL dev sentences name entities
        with pytest.raises(errors.InputError, match="exit_threshold"):
            client.predict(name, examples[0].raw, params={"exit_threshold": -1.0})
