"""metadata.json: what the build measured for one Triton model, as a typed record with a schema version.

The build writes it (`VariantMetadata.save`) beside config.pbtxt; the gateway, the report and the benchmark
read it back through the same class (`VariantMetadata.load`), never as a dict. A file written by an older
dyngate (no or another `schema_version`) is refused with `StaleRepositoryError`, whose message says how to
rebuild. Light on purpose (json and dataclasses only): the gateway imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from dyngate_build.errors import RepositoryError

SCHEMA_VERSION = 1
METADATA_FILE = "metadata.json"


class StaleRepositoryError(RepositoryError):
    """A repository file was written by another dyngate version (schema mismatch); rebuild it."""


def rebuild_hint(model: str | None = None) -> str:
    """The command that rewrites a model's variants with this dyngate."""
    return (f"rebuild it with `dyngate build --model {model or 'M'} --techniques T1,T2,...` "
            "(the techniques it was built with)")


@dataclass
class MetricRecord:
    """A task metric on the dev split: name ("accuracy" | "entity_f1"), value in [0, 1], n examples,
    examples_sha256 the dev sample's digest (`dev_sample_digest`; None in a metadata.json written before the
    build recorded it)."""

    name: str
    value: float
    n: int
    examples_sha256: str | None = None


@dataclass
class AgreementRecord:
    """Agreement with the FP32 PyTorch reference: largest |Δlogit|, fraction of equal top-1, n inputs."""

    max_abs_logit: float
    top1: float
    n: int


@dataclass
class ToleranceRecord:
    """What the build demanded: largest |Δlogit| allowed and smallest top-1 agreement."""

    max_abs_logit: float
    min_top1_agreement: float


@dataclass
class LatencyRecord:
    """In-process per-request latency (ms) at `batch_size`, `threads` intra-op threads, over n requests."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    n: int
    batch_size: int = 1
    threads: int | None = None


@dataclass
class SourceRecord:
    """The source model: where it came from and its HF family."""

    location: str
    checkpoint: str
    model_type: str
    hf_class: str
    task: str


@dataclass
class MachineRecord:
    """The machine the build measured on."""

    cpu: str
    cores: int | None


@dataclass
class ServingRecord:
    """How Triton serves the variant (dyngate_build.repository.ServingOptions): largest batch, dynamic batching
    window (µs), model instances, intra-op threads per instance, instance kind."""

    max_batch_size: int
    queue_delay_us: int
    instances: int
    threads: int
    kind: str


_NESTED = {"accuracy": MetricRecord, "reference_accuracy": MetricRecord, "agreement": AgreementRecord,
           "tolerance": ToleranceRecord, "latency_in_process": LatencyRecord, "source": SourceRecord,
           "machine": MachineRecord, "serving": ServingRecord}


@dataclass
class VariantMetadata:
    """One Triton model's metadata.json (python or native flavour of a variant).

    Attributes: model, variant, triton_name, flavour ("python" | "native"), technique, params (the
    technique's settings), engine (runtime engine), source, labels, client_input ("TEXT" | "IMAGE"),
    size_bytes / size_mb (the graph on disk), num_parameters, accuracy and reference_accuracy (dev metric of
    the variant and of the FP32 PyTorch reference), agreement, tolerance, latency_in_process, notes,
    technique_report (technique-specific measurements), built_at (ISO 8601 UTC), machine, dyngate_version,
    version (the version folder it describes; set when published), schema_version.
    """

    model: str
    variant: str
    triton_name: str
    flavour: str
    technique: str
    params: dict
    engine: str
    source: SourceRecord
    labels: list[str]
    client_input: str
    size_bytes: int
    size_mb: float
    num_parameters: int
    accuracy: MetricRecord
    reference_accuracy: MetricRecord
    agreement: AgreementRecord
    tolerance: ToleranceRecord
    latency_in_process: LatencyRecord
    notes: list[str] = field(default_factory=list)
    technique_report: dict = field(default_factory=dict)
    built_at: str = ""
    machine: MachineRecord | None = None
    dyngate_version: str = ""
    version: int | None = None
    serving: ServingRecord | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def task(self) -> str:
        return self.source.task

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, folder: Path) -> Path:
        """Write folder/metadata.json; returns its path."""
        path = Path(folder) / METADATA_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    @classmethod
    def from_dict(cls, data: dict, where: str = METADATA_FILE) -> "VariantMetadata":
        """Parse a metadata.json object; StaleRepositoryError when its schema is not this dyngate's."""
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            found = data.get("schema_version", "none") if isinstance(data, dict) else type(data).__name__
            model = data.get("model") if isinstance(data, dict) else None
            raise StaleRepositoryError(
                f"{where} has schema_version {found}, this dyngate reads {SCHEMA_VERSION}: it was written by an "
                f"older dyngate; {rebuild_hint(model)}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {k: (_NESTED[k](**v) if k in _NESTED and isinstance(v, dict) else v)
                      for k, v in data.items() if k in names}
            return cls(**values)
        except TypeError as e:
            raise StaleRepositoryError(f"{where} does not match schema_version {SCHEMA_VERSION} ({e}); "
                                       f"{rebuild_hint(data.get('model'))}") from None

    @classmethod
    def load(cls, folder: Path) -> "VariantMetadata":
        """Read folder/metadata.json. RepositoryError when unreadable, StaleRepositoryError when stale."""
        path = Path(folder) / METADATA_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RepositoryError(f"cannot read {path}: {e}; {rebuild_hint()}") from None
        return cls.from_dict(data, str(path))


def dev_sample_digest(raws) -> str:
    """The identity of a dev sample: sha256 (hex, 64 characters) over the sha256 of each example's raw request
    bytes, in order. raws: an iterable of bytes (data.Example.raw). Recorded as `MetricRecord.examples_sha256` and
    `DevScores.examples_sha256`; compared by `dev_sample_mismatch`."""
    digest = hashlib.sha256()
    for raw in raws:
        digest.update(hashlib.sha256(raw).digest())
    return digest.hexdigest()


def dev_sample_mismatch(n: int | None, sha256: str | None, reference_n: int | None, reference_sha256: str | None,
                        reference: str, metric_name: str) -> str | None:
    """Why a dev metric measured on one dev sample (`n` examples, digest `sha256`) cannot be set beside the
    `reference` variant's (`reference_n`, `reference_sha256`); None when both were measured on the same sample.

    The one rule for every place that compares dev metrics or per-example dev scores of two variants
    (dyngate_measure.recommend: `build_candidates` and the cascade threshold's DevScores; dyngate_measure.report;
    the gateway's policies and Compare tab). Two builds with another `--eval-limit` or `--data` score different
    dev examples, so the Δ in points between them says nothing (found in a trial: an early-exit variant scored on
    200 examples read +1.08 pt beside fp32 on 872 while it was −0.50 pt against its own FP32 reference).
    - Where both sides carry the digest (`dev_sample_digest`), the digests must be equal: another data file or
      another order of the same number of examples is another sample.
    - Metadata written before the digest was recorded (`MetricRecord.examples_sha256` None on either side) gets
      the weaker rule: equal numbers of examples.
    - Different counts are a mismatch whatever the digests say; an unknown count or digest is never one.
    reference, metric_name: words for the message (the reference variant, "accuracy" | "entity_f1").
    """
    if n is not None and reference_n is not None and int(n) != int(reference_n):
        return (f"{metric_name} measured on {n} dev examples, {reference}'s on {reference_n}: not comparable; "
                f"rebuild both with the same --eval-limit")
    if sha256 is not None and reference_sha256 is not None and sha256 != reference_sha256:
        return (f"{metric_name} measured on other dev examples than {reference}'s ({n} each, digests "
                f"{sha256[:12]} and {reference_sha256[:12]}): not comparable; rebuild both with the same --data "
                f"and --eval-limit")
    return None


DEV_SCORES_FILE = "dev_scores.json"


@dataclass
class DevScores:
    """dev_scores.json: one variant's answer on every dev example, as the build measured it through the served
    runtime (default request options). The gateway chooses a cascade threshold from these
    (dyngate_measure.recommend.choose_cascade_threshold) without asking Triton. It lives in the version folder
    it describes, so it moves and is replaced with that version.

    metric: "accuracy" | "entity_f1". examples_sha256: the dev sample's digest (`dev_sample_digest`; two variants'
    scores are only combined when `dev_sample_mismatch` finds none). Per example, lists of n: confidence (runtime.answer_confidence: the
    value the cascade compares with its threshold), hits / predicted / gold: correct, predicted and gold items
    (classification: 1/1/1 when right, 0/1/1 when wrong; NER: exact entity spans, which micro F1 sums).
    """

    metric: str
    examples_sha256: str
    confidence: list[float]
    hits: list[int]
    predicted: list[int]
    gold: list[int]
    schema_version: int = SCHEMA_VERSION

    @property
    def n(self) -> int:
        return len(self.confidence)

    def save(self, folder: Path) -> Path:
        """Write folder/dev_scores.json (one line: ~10 KB for SST-2's 872 examples); returns its path."""
        path = Path(folder) / DEV_SCORES_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), separators=(",", ":")))
        return path

    @classmethod
    def load(cls, folder: Path) -> "DevScores":
        """Read folder/dev_scores.json. RepositoryError when missing or unreadable, StaleRepositoryError when its
        schema is not this dyngate's."""
        path = Path(folder) / DEV_SCORES_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RepositoryError(f"cannot read {path}: {e}; {rebuild_hint()} to store the variant's dev scores") \
                from None
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            raise StaleRepositoryError(f"{path} was written by another dyngate (schema_version "
                                       f"{data.get('schema_version') if isinstance(data, dict) else None}, this "
                                       f"dyngate reads {SCHEMA_VERSION}); {rebuild_hint()}")
        try:
            scores = cls(**data)
        except TypeError as e:
            raise StaleRepositoryError(f"{path} does not match schema_version {SCHEMA_VERSION} ({e}); "
                                       f"{rebuild_hint()}") from None
        lengths = {len(scores.confidence), len(scores.hits), len(scores.predicted), len(scores.gold)}
        if len(lengths) != 1:
            raise RepositoryError(f"{path}: its per-example lists differ in length ({sorted(lengths)}); "
                                  f"{rebuild_hint()}")
        return scores


def metric_from_counts(metric: str, hits, predicted, gold) -> float:
    """The dev metric from per-example counts (DevScores' hits / predicted / gold, sequences of ints, equal
    length n): "accuracy" = Σhits / n; "entity_f1" = micro F1 over exact spans, 2·Σhits / (Σpredicted + Σgold)
    (seqeval's default mode for CoNLL). 0.0 when there is nothing to count."""
    if metric == "entity_f1":
        denominator = sum(predicted) + sum(gold)
        return 2.0 * sum(hits) / denominator if denominator else 0.0
    return sum(hits) / len(hits) if len(hits) else 0.0
