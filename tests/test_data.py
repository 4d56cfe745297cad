"""dyngate_build.data: sources from settings, the shared SST-2/CoNLL files, digits, and clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dyngate_build.data import (CONLL_LABELS, ENV_VAR, DataSource, Example, bio_spans, load_digit_images, load_examples,
                        load_text_pairs, load_token_sentences)
from dyngate_build.errors import ConfigError, SourceError
from dyngate_build.families import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def shared() -> DataSource:
    return DataSource.from_setting(str(SHARED))


def test_default_source_is_shared_data(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    source = DataSource.from_setting(None)
    assert source.kind == "folder" and Path(source.location).resolve() == SHARED.resolve() and source.origin == "default"


def test_env_var_and_hf_setting(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert DataSource.from_setting(None) == DataSource("folder", str(tmp_path.resolve()), ENV_VAR)
    assert DataSource.from_setting("hf:stanfordnlp/sst2") == DataSource("hf", "stanfordnlp/sst2", "--data")


def test_missing_path_names_setting(tmp_path):
    with pytest.raises(SourceError, match="--data.*DYNGATE_DATA"):
        DataSource.from_setting(str(tmp_path / "nowhere"))


def test_missing_split_file_names_path_and_setting(tmp_path):
    source = DataSource.from_setting(str(tmp_path))
    with pytest.raises(SourceError, match=r"dev\.tsv.*DYNGATE_DATA"):
        load_text_pairs("dev", source)
    with pytest.raises(SourceError, match=r"train\.txt"):
        load_token_sentences("train", source)


def test_bad_split_and_task(shared):
    with pytest.raises(ConfigError, match="split"):
        load_examples(TEXT_CLASSIFICATION, "test", shared)
    with pytest.raises(ConfigError, match="task"):
        load_examples("summarization", "dev", shared)


def test_sst2_dev(shared):
    examples, names = load_examples(TEXT_CLASSIFICATION, "dev", shared)
    assert names == ["negative", "positive"]
    assert len(examples) == 872
    assert all(isinstance(e, Example) and isinstance(e.raw, bytes) and e.target in (0, 1) for e in examples)
    assert {e.target for e in examples} == {0, 1}
    limited, _ = load_examples(TEXT_CLASSIFICATION, "dev", shared, limit=5)
    assert limited == examples[:5]


def test_sst2_train_pairs(shared):
    texts, labels, names = load_text_pairs("train", shared, limit=100)
    assert len(texts) == len(labels) == 100 and names == ["negative", "positive"]
    assert texts[0] == "hide new secretions from the parental units" and labels[0] == 0


def test_conll_dev_spans_match_words(shared):
    words, tags, names = load_token_sentences("dev", shared)
    assert names == CONLL_LABELS and names[0] == "O"
    assert len(words) == 3250 and all(len(w) == len(t) for w, t in zip(words, tags))
    examples, labels = load_examples(TOKEN_CLASSIFICATION, "dev", shared, limit=200)
    assert labels == CONLL_LABELS
    entity_words = 0
    for example, sentence, sentence_tags in zip(examples, words, tags):
        text = example.raw.decode("utf-8")
        assert text == " ".join(sentence)
        for kind, start, end in example.target:
            assert kind in ("PER", "ORG", "LOC", "MISC") and text[start:end].strip() == text[start:end]
        entity_words += sum(t.startswith("B-") for t in sentence_tags)
    assert sum(len(e.target) for e in examples) >= entity_words > 0  # an I-X after O also opens an entity


def test_bio_spans():
    words = ["EU", "rejects", "German", "call", "Peter", "Blackburn", "in", "New", "York"]
    tags = ["B-ORG", "O", "B-MISC", "O", "B-PER", "I-PER", "O", "I-LOC", "I-LOC"]
    text = " ".join(words)
    spans = bio_spans(words, tags)
    assert [(k, text[s:e]) for k, s, e in spans] == [
        ("ORG", "EU"), ("MISC", "German"), ("PER", "Peter Blackburn"), ("LOC", "New York")]


def test_digits_split_is_deterministic_and_disjoint():
    train_images, train_labels = load_digit_images("train")
    dev_images, dev_labels = load_digit_images("dev")
    assert train_images.shape == (1438, 8, 8) and dev_images.shape == (359, 8, 8)
    assert train_images.dtype == np.uint8 and train_images.max() == 255
    again, _ = load_digit_images("dev")
    assert np.array_equal(again, dev_images)
    assert set(dev_labels.tolist()) == set(range(10))


def test_digit_examples_are_8x8_grayscale_png(shared):
    examples, names = load_examples(IMAGE_CLASSIFICATION, "dev", shared, limit=4)
    images, labels = load_digit_images("dev", limit=4)
    assert names == [str(i) for i in range(10)]
    for example, image, label in zip(examples, images, labels):
        decoded = Image.open(io.BytesIO(example.raw))
        assert decoded.format == "PNG" and decoded.mode == "L" and decoded.size == (8, 8)
        assert np.array_equal(np.asarray(decoded), image) and example.target == int(label)


def test_single_files(tmp_path):
    tsv = tmp_path / "reviews.csv"
    tsv.write_text('text,label\n"good, fun",pos\nawful,neg\n')
    texts, labels, names = load_text_pairs("dev", DataSource.from_setting(str(tsv)))
    assert texts == ["good, fun", "awful"] and names == ["neg", "pos"] and labels == [1, 0]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0}\n')
    examples, names = load_examples(TEXT_CLASSIFICATION, "train", DataSource.from_setting(str(jsonl)))
    assert [e.raw for e in examples] == [b"a", b"b"] and names == ["negative", "positive"]
    conll = tmp_path / "ner.conll"
    conll.write_text("-DOCSTART- -X- O O\n\nJohn NNP B-NP B-PER\nlives VBZ B-VP O\n\nParis NNP B-NP B-LOC\n")
    examples, names = load_examples(TOKEN_CLASSIFICATION, "dev", DataSource.from_setting(str(conll)))
    assert [e.raw for e in examples] == [b"John lives", b"Paris"]
    assert examples[0].target == [("PER", 0, 4)] and names == CONLL_LABELS


def test_empty_and_malformed_files(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("label\tsentence\n")
    with pytest.raises(SourceError, match="no examples"):
        load_text_pairs("train", DataSource.from_setting(str(empty)))
    bad = tmp_path / "bad.conll"
    bad.write_text("John X-PER\n")
    with pytest.raises(SourceError, match="not BIO"):
        load_token_sentences("train", DataSource.from_setting(str(bad)))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    with pytest.raises(SourceError, match="no sentences"):
        load_token_sentences("train", DataSource.from_setting(str(blank)))


def test_image_folder(tmp_path):
    for split in ("train", "dev"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / split / name / "a.png")
    examples, names = load_examples(IMAGE_CLASSIFICATION, "dev", DataSource.from_setting(str(tmp_path)))
    assert names == ["cat", "dog"] and [e.target for e in examples] == [0, 1]
    assert Image.open(io.BytesIO(examples[0].raw)).size == (16, 16)


def test_hf_source_without_datasets_says_how_to_fix():
    pytest.importorskip("dyngate_build.data")
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed; this checks the message when it is not")
    except ImportError:
        pass
    with pytest.raises(SourceError, match="pip install datasets"):
        load_text_pairs("dev", DataSource.from_setting("hf:stanfordnlp/sst2"))
