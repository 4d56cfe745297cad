"""dyngate_build.presets: each offline preset is a normal HF checkpoint that loads, tokenizes and scores sanely.

Presets come from the session fixture `preset_checkpoint` (tests/conftest.py): trained once into the cache
folder (a few minutes on 2 cores) and reused afterwards.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dyngate_build.data import DataSource, load_digit_images, load_text_pairs, load_token_sentences
from dyngate_build.errors import ConfigError
from dyngate_build.presets import PRESET_FILE, PRESETS, ensure_preset, token_classifier_scores

# Sane floors, below the aims (SST-2 >= 0.78, digits >= 0.90, CoNLL F1 >= 0.60) to leave room for seeds.
FLOORS = {"distilbert-tiny": 0.75, "vit-tiny": 0.85, "deberta-tiny": 0.55}


@pytest.fixture(scope="session")
def shared_source(data_source) -> DataSource:
    return data_source


@pytest.fixture(scope="session")
def checkpoint(preset_checkpoint):
    return preset_checkpoint


def test_registry_covers_every_family():
    from dyngate_build.families import registered_families

    assert {spec.model_type for spec in PRESETS.values()} == set(registered_families())


def test_unknown_preset_lists_known(tmp_path, shared_source):
    with pytest.raises(ConfigError, match="distilbert-tiny.*vit-tiny"):
        ensure_preset("bert-huge", tmp_path, shared_source)


@pytest.mark.parametrize("name", sorted(FLOORS))  # distilbert-6l trains for `make bench`, not for the tests
def test_preset_checkpoint_is_reused_and_reaches_its_floor(checkpoint, name):
    folder = checkpoint(name)
    info = json.loads((folder / PRESET_FILE).read_text())
    assert info[PRESETS[name].metric] >= FLOORS[name]
    assert info["training_seconds"] > 0 and info["data_source"]
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert checkpoint(name) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(folder.parent.glob(f".tmp-{name}-{os.getpid()}"))


def test_distilbert_tiny_loads_and_classifies(checkpoint, shared_source):
    from transformers import AutoTokenizer, DistilBertForSequenceClassification

    folder = checkpoint("distilbert-tiny")
    assert (folder / "tokenizer.json").is_file()
    model = DistilBertForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert tokenizer.pad_token == "[PAD]" and tokenizer.cls_token == "[CLS]" and tokenizer.mask_token == "[MASK]"
    assert tokenizer("A Fine Film")["input_ids"] == tokenizer("a fine film")["input_ids"]  # lowercased
    texts, labels, _ = load_text_pairs("dev", shared_source, limit=200)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] < 128  # padded to the longest, not to 128
    with torch.inference_mode():
        predicted = model(**batch).logits.argmax(-1)
    assert (predicted == torch.tensor(labels)).float().mean() >= FLOORS["distilbert-tiny"] - 0.05


def test_vit_tiny_loads_with_its_processor(checkpoint):
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    folder = checkpoint("vit-tiny")
    model = ViTForImageClassification.from_pretrained(folder).eval()
    processor = ViTImageProcessor.from_pretrained(folder)
    assert processor.size == {"height": 32, "width": 32} and list(processor.image_mean) == [0.5, 0.5, 0.5]
    assert model.config.num_channels == 3 and model.config.id2label[7] == "7"
    images, labels = load_digit_images("dev")
    pixels = processor(images=[Image.fromarray(i, mode="L").convert("RGB") for i in images],
                       return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        accuracy = (model(pixel_values=pixels).logits.argmax(-1) == torch.from_numpy(labels)).float().mean()
    assert accuracy >= FLOORS["vit-tiny"]


def test_deberta_tiny_words_are_pre_tokens_and_f1_holds(checkpoint, shared_source):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, DebertaV2ForTokenClassification

    folder = checkpoint("deberta-tiny")
    model = DebertaV2ForTokenClassification.from_pretrained(folder).eval()
    assert model.config.id2label[0] == "O" and len(model.config.id2label) == 9
    assert AutoTokenizer.from_pretrained(folder).sep_token == "[SEP]"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))  # as the serving runtime reads it
    words, tags, names = load_token_sentences("dev", shared_source, limit=300)
    for sentence in words[:50]:
        encoding = tokenizer.encode(" ".join(sentence))
        assert max(w for w in encoding.word_ids if w is not None) == len(sentence) - 1
    scores = token_classifier_scores(model, tokenizer, words, tags, names, tokenizer.token_to_id("[PAD]"))
    assert scores["f1"] >= FLOORS["deberta-tiny"] - 0.05
