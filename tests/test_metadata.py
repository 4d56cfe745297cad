"""metadata.json and runtime.json are typed records with a schema version: read back through their classes, and a
repository written by an older dyngate is refused with a typed error saying how to rebuild."""

from __future__ import annotations

import json

import pytest

from dyngate_build.metadata import (SCHEMA_VERSION, AgreementRecord, LatencyRecord, MetricRecord, SourceRecord,
                                    StaleRepositoryError, ToleranceRecord, VariantMetadata, dev_sample_digest,
                                    dev_sample_mismatch)
from dyngate_build.repository import ServingOptions, finish_model, list_models, python_config
from dyngate_build.runtime import RuntimeSpec, RuntimeSpecVersionError


def _metadata() -> VariantMetadata:
    return VariantMetadata(
        model="m", variant="fp32", triton_name="m__fp32", flavour="python", technique="fp32", params={},
        engine="onnxruntime", source=SourceRecord("m", "/ckpt", "distilbert", "DistilBertForSequenceClassification",
                                                  "text-classification"),
        labels=["neg", "pos"], client_input="TEXT", size_bytes=10, size_mb=0.0, num_parameters=5,
        accuracy=MetricRecord("accuracy", 0.9, 8), reference_accuracy=MetricRecord("accuracy", 0.9, 8),
        agreement=AgreementRecord(0.0, 1.0, 8), tolerance=ToleranceRecord(1e-3, 0.99),
        latency_in_process=LatencyRecord(1.0, 1.5, 2.0, 1.2, 8, 1, 2))


def _model_folder(root, metadata) -> None:
    folder = root / "m__fp32"
    (folder / "1").mkdir(parents=True)
    finish_model(folder, python_config("m__fp32", "TEXT", 1, ServingOptions()), metadata)


def test_metadata_round_trips_through_the_class(tmp_path):
    _model_folder(tmp_path, _metadata())
    (entry,) = list_models(tmp_path)
    assert entry.metadata == _metadata() and entry.metadata.schema_version == SCHEMA_VERSION
    assert entry.metadata.accuracy.value == 0.9 and entry.metadata.task == "text-classification"
    assert entry.model == "m" and entry.variant == "fp32"


def test_a_repository_from_an_older_dyngate_is_refused_with_how_to_rebuild(tmp_path):
    old = _metadata().to_dict()
    del old["schema_version"]
    _model_folder(tmp_path, old)
    with pytest.raises(StaleRepositoryError, match=r"older dyngate.*dyngate build --model m --techniques"):
        list_models(tmp_path)


def test_runtime_json_from_an_older_dyngate_is_refused(tmp_path):
    RuntimeSpec(task="text-classification", client_input="TEXT", engine="onnxruntime", artifact="model.onnx",
                graph_inputs=["input_ids", "attention_mask"], labels=["a", "b"]).save(str(tmp_path))
    assert RuntimeSpec.load(str(tmp_path)).labels == ["a", "b"]
    data = json.loads((tmp_path / "runtime.json").read_text())
    del data["schema_version"]
    (tmp_path / "runtime.json").write_text(json.dumps(data))
    with pytest.raises(RuntimeSpecVersionError, match="dyngate build --model"):
        RuntimeSpec.load(str(tmp_path))


def test_metadata_without_the_dev_sample_digest_reads_back_with_none(tmp_path):
    """metadata.json written before the build recorded the dev sample's digest is still read (schema 1)."""
    old = _metadata().to_dict()
    del old["accuracy"]["examples_sha256"]
    _model_folder(tmp_path, old)
    (entry,) = list_models(tmp_path)
    assert entry.metadata.accuracy.examples_sha256 is None and entry.metadata.accuracy.n == 8


def test_same_dev_sample_is_the_digest_where_both_have_it_else_the_count():
    sst2 = [b"a fine film", b"a dull film", b"no plot"]
    digest = dev_sample_digest(sst2)
    assert len(digest) == 64 and digest == dev_sample_digest(iter(sst2))
    other = dev_sample_digest(sst2[::-1])  # the same examples in another order: another sample
    assert other != digest
    assert dev_sample_mismatch(3, digest, 3, digest, "fp32", "accuracy") is None
    assert "other dev examples than fp32's" in dev_sample_mismatch(3, other, 3, digest, "fp32", "accuracy")
    assert dev_sample_mismatch(2, dev_sample_digest(sst2[:2]), 3, digest, "fp32", "accuracy").startswith(
        "accuracy measured on 2 dev examples, fp32's on 3")
    # older metadata (no digest on one side): only the counts are compared
    assert dev_sample_mismatch(3, None, 3, digest, "fp32", "accuracy") is None
    assert dev_sample_mismatch(3, digest, 3, None, "fp32", "accuracy") is None
    assert "on 2 dev examples" in dev_sample_mismatch(2, None, 3, digest, "fp32", "entity_f1")
    assert dev_sample_mismatch(None, None, 3, digest, "fp32", "accuracy") is None
