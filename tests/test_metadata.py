"""metadata.json and runtime.json are typed records with a schema version: read back through their classes, and a
repository written by an older dyngate is refused with a typed error saying how to rebuild."""

from __future__ import annotations

import json

import pytest

from dyngate_build.metadata import (SCHEMA_VERSION, AgreementRecord, LatencyRecord, MetricRecord, SourceRecord,
                                    StaleRepositoryError, ToleranceRecord, VariantMetadata)
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
