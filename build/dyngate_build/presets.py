"""Offline presets: small checkpoints of the real HF classes, trained here on the project's data.

`ensure_preset(name, cache_dir, source)` returns `<cache_dir>/presets/<name>/`, a normal HF checkpoint
(`config.json` with id2label, `model.safetensors`, `tokenizer.json` or `preprocessor_config.json`, and
`preset.json` with the dev metric, training seconds and data source). It is trained once, in a temporary
folder renamed into place at the end, and reused afterwards (`force=True` retrains).

- distilbert-tiny: DistilBertForSequenceClassification on SST-2, lowercase WordPiece tokenizer.
- distilbert-6l: the same at DistilBERT's depth (6 layers, width 128, 4 heads, FFN 512), so early exit has
  five off-ramps and head pruning removes real heads; trained once (1674 s measured on 1 thread of 2 busy
  cores), not used by the tests.
- vit-tiny: ViTForImageClassification on scikit-learn digits (32x32, patch 8, RGB; mean/std 0.5).
- deberta-tiny: DebertaV2ForTokenClassification on CoNLL-2003; cased WordPiece split on whitespace only, so
  each CoNLL word is one pre-token; only a word's first sub-token carries its label.
Training goes through `dyngate_build.training.train`; batches are padded to their longest text, never to 128.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dyngate_build.data import DataSource, bio_spans, load_digit_images, load_text_pairs, load_token_sentences
from dyngate_build.data import encode_png
from dyngate_build.errors import ConfigError
from dyngate_build.evaluate import entity_scores
from dyngate_build.families import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION
from dyngate_build.runtime import to_rgb
from dyngate_build.training import TrainingConfig, train

log = logging.getLogger("dyngate.presets")

PRESET_FILE = "preset.json"
MAX_LENGTH = 128
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


@dataclass(frozen=True)
class PresetSpec:
    """One offline preset: the family it builds, its task, its metric name and how it is trained."""

    name: str
    model_type: str
    task: str
    metric: str
    training: TrainingConfig
    builder: Callable[["PresetSpec", Path, DataSource], dict]
    description: str


# ---------------------------------------------------------------------------------------------- public API

def ensure_preset(name: str, cache_dir: Path, source: DataSource, force: bool = False) -> Path:
    """Return the checkpoint folder of preset `name`, training it into `<cache_dir>/presets/<name>` if absent."""
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
    spec = PRESETS[name]
    final = Path(cache_dir) / "presets" / name
    if (final / PRESET_FILE).is_file() and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final.parent, name)
    temp = final.parent / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        start = time.perf_counter()
        info = spec.builder(spec, temp, source)
        info.update({"preset": name, "model_type": spec.model_type, "task": spec.task,
                     "total_seconds": round(time.perf_counter() - start, 1), "data_source": source.describe(),
                     "training_config": spec.training.to_dict()})
        (temp / PRESET_FILE).write_text(json.dumps(info, indent=2))
        if final.exists():
            shutil.rmtree(final)
        temp.rename(final)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    log.info("preset %s: %s %.4f after %.0f s", name, spec.metric, info[spec.metric], info["training_seconds"])
    return final


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Delete temporary folders of `name` left by processes that died while training."""
    for temp in parent.glob(f".tmp-{name}-*"):
        try:
            os.kill(int(temp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(temp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


# ---------------------------------------------------------------------------------------------- helpers

def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _shuffled_batches(count: int, batch_size: int, make: Callable[[list[int]], dict], seed: int):
    """A callable giving one epoch of batches in a fresh seeded order each call; has len()."""

    class Epochs:
        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return (count + batch_size - 1) // batch_size

        def __call__(self):
            order = np.random.default_rng(seed + self.epoch).permutation(count)
            self.epoch += 1
            return [make(order[i:i + batch_size].tolist()) for i in range(0, count, batch_size)]

    return Epochs()


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _wrap_tokenizer(tokenizer) -> "object":
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=MAX_LENGTH, **SPECIAL_TOKENS)


def _train_wordpiece(texts: list[str], vocab_size: int, lowercase: bool, whitespace_only: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase,
                                                      clean_text=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.WhitespaceSplit() if whitespace_only
                               else pre_tokenizers.BertPreTokenizer())
    tokenizer.decoder = decoders.WordPiece()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id),
                                                                                    ("[SEP]", sep_id)])
    tokenizer.enable_truncation(MAX_LENGTH)
    return tokenizer


def _label_maps(names: list[str]) -> dict:
    return {"id2label": {i: n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


# ---------------------------------------------------------------------------------------------- distilbert-tiny

# Architecture of each DistilBERT preset: width, depth, heads, FFN width.
DISTILBERT_SHAPES = {"distilbert-tiny": {"dim": 128, "n_layers": 2, "n_heads": 2, "hidden_dim": 512},
                     "distilbert-6l": {"dim": 128, "n_layers": 6, "n_heads": 4, "hidden_dim": 512}}


def _build_distilbert(spec: PresetSpec, folder: Path, source: DataSource) -> dict:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    _seed(spec.training.seed)
    texts, labels, names = load_text_pairs("train", source)
    dev_texts, dev_labels, _ = load_text_pairs("dev", source)
    tokenizer = _train_wordpiece(texts, vocab_size=8000, lowercase=True, whitespace_only=False)
    pad_id = tokenizer.token_to_id("[PAD]")
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    config = DistilBertConfig(vocab_size=tokenizer.get_vocab_size(), **DISTILBERT_SHAPES[spec.name],
                              max_position_embeddings=512, dropout=0.1, attention_dropout=0.1,
                              seq_classif_dropout=0.1, pad_token_id=pad_id, **_label_maps(names))
    model = DistilBertForSequenceClassification(config)
    target = torch.tensor(labels, dtype=torch.long)

    def make(index: list[int]) -> dict:
        input_ids = _pad([ids[i] for i in index], pad_id)
        return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": target[index]}

    batches = _shuffled_batches(len(ids), spec.training.micro_batch_size, make, spec.training.seed)
    result = train(model, batches, spec.training, desc=spec.name)
    accuracy = _text_accuracy(model, tokenizer, dev_texts, dev_labels, pad_id)
    model.save_pretrained(folder)
    _wrap_tokenizer(tokenizer).save_pretrained(folder)
    return {"accuracy": accuracy, "training_seconds": round(result.seconds, 1), "steps": result.steps,
            "final_loss": result.final_loss, "dev_examples": len(dev_texts)}


@torch.inference_mode()
def _text_accuracy(model, tokenizer, texts: list[str], labels: list[int], pad_id: int) -> float:
    correct = 0
    for start in range(0, len(texts), 64):
        input_ids = _pad([e.ids for e in tokenizer.encode_batch(texts[start:start + 64])], pad_id)
        logits = model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long()).logits
        correct += int((logits.argmax(-1) == torch.tensor(labels[start:start + 64])).sum())
    return correct / len(texts)


# ---------------------------------------------------------------------------------------------- vit-tiny

IMAGE_SIZE = 32


def _image_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=2,
                             do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _digit_pixels(processor, images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 8, 8] -> the pixel_values a client's PNG becomes (PNG -> PIL -> RGB -> processor)."""
    from PIL import Image

    pil = [to_rgb(Image.open(io.BytesIO(encode_png(image)))) for image in images]
    return processor(images=pil, return_tensors="pt")["pixel_values"]


def _shift(pixels: torch.Tensor, generator: torch.Generator, most: int = 3) -> torch.Tensor:
    """Random translation by up to `most` pixels, background filled with the normalised 0 (-1)."""
    padded = torch.nn.functional.pad(pixels, (most, most, most, most), value=-1.0)
    out = torch.empty_like(pixels)
    offsets = torch.randint(0, 2 * most + 1, (len(pixels), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + pixels.shape[2], dx:dx + pixels.shape[3]]
    return out


def _build_vit(spec: PresetSpec, folder: Path, source: DataSource) -> dict:
    from transformers import ViTConfig, ViTForImageClassification

    _seed(spec.training.seed)
    processor = _image_processor()
    train_images, train_labels = load_digit_images("train")
    dev_images, dev_labels = load_digit_images("dev")
    pixels = _digit_pixels(processor, train_images)
    target = torch.from_numpy(train_labels)
    names = [str(i) for i in range(10)]
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=256, hidden_dropout_prob=0.1,
                       attention_probs_dropout_prob=0.0, **_label_maps(names))
    model = ViTForImageClassification(config)
    generator = torch.Generator().manual_seed(spec.training.seed)

    def make(index: list[int]) -> dict:
        return {"pixel_values": _shift(pixels[index], generator), "labels": target[index]}

    batches = _shuffled_batches(len(pixels), spec.training.micro_batch_size, make, spec.training.seed)
    result = train(model, batches, spec.training, desc=spec.name)
    with torch.inference_mode():
        predicted = model(pixel_values=_digit_pixels(processor, dev_images)).logits.argmax(-1)
    accuracy = float((predicted == torch.from_numpy(dev_labels)).float().mean())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return {"accuracy": accuracy, "training_seconds": round(result.seconds, 1), "steps": result.steps,
            "final_loss": result.final_loss, "dev_examples": len(dev_labels)}


# ---------------------------------------------------------------------------------------------- deberta-tiny

def _word_labels(encoding, tags: list[str], label2id: dict) -> list[int]:
    """Label of each token: the word's tag on its first sub-token, -100 elsewhere."""
    out, seen = [], set()
    for word_id in encoding.word_ids:
        if word_id is None or word_id in seen:
            out.append(-100)
        else:
            seen.add(word_id)
            out.append(label2id[tags[word_id]])
    return out


def _build_deberta(spec: PresetSpec, folder: Path, source: DataSource) -> dict:
    from transformers import DebertaV2Config, DebertaV2ForTokenClassification

    _seed(spec.training.seed)
    words, tags, names = load_token_sentences("train", source)
    dev_words, dev_tags, _ = load_token_sentences("dev", source)
    label2id = {n: i for i, n in enumerate(names)}
    texts = [" ".join(w) for w in words]
    tokenizer = _train_wordpiece(texts, vocab_size=12000, lowercase=False, whitespace_only=True)
    pad_id = tokenizer.token_to_id("[PAD]")
    encodings = tokenizer.encode_batch(texts)
    ids = [e.ids for e in encodings]
    token_labels = [_word_labels(e, t, label2id) for e, t in zip(encodings, tags)]
    config = DebertaV2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=128, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=256, max_position_embeddings=512,
                             relative_attention=True, position_buckets=32, max_relative_positions=-1,
                             pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm",
                             share_att_key=True, type_vocab_size=0, pad_token_id=pad_id,
                             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **_label_maps(names))
    model = DebertaV2ForTokenClassification(config)

    def make(index: list[int]) -> dict:
        input_ids = _pad([ids[i] for i in index], pad_id)
        return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(),
                "labels": _pad([token_labels[i] for i in index], -100)}

    batches = _shuffled_batches(len(ids), spec.training.micro_batch_size, make, spec.training.seed)
    result = train(model, batches, spec.training, desc=spec.name)
    scores = token_classifier_scores(model, tokenizer, dev_words, dev_tags, names, pad_id)
    model.save_pretrained(folder)
    _wrap_tokenizer(tokenizer).save_pretrained(folder)
    return {"f1": scores["f1"], "precision": scores["precision"], "recall": scores["recall"],
            "training_seconds": round(result.seconds, 1), "steps": result.steps, "final_loss": result.final_loss,
            "dev_examples": len(dev_words)}


@torch.inference_mode()
def token_classifier_scores(model, tokenizer, words: list[list[str]], tags: list[list[str]], names: list[str],
                            pad_id: int) -> dict:
    """Exact-span entity precision/recall/F1 of a token classifier on word-tagged sentences (word label = first
    sub-token's), scored by `dyngate_build.evaluate.entity_scores`."""
    guesses, golds = [], []
    for start in range(0, len(words), 64):
        chunk_words, chunk_tags = words[start:start + 64], tags[start:start + 64]
        encodings = tokenizer.encode_batch([" ".join(w) for w in chunk_words])
        input_ids = _pad([e.ids for e in encodings], pad_id)
        best = model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long()).logits.argmax(-1)
        for row, (encoding, sentence, gold_tags) in enumerate(zip(encodings, chunk_words, chunk_tags)):
            predicted = ["O"] * len(sentence)
            seen = set()
            for position, word_id in enumerate(encoding.word_ids):
                if word_id is not None and word_id not in seen:
                    seen.add(word_id)
                    predicted[word_id] = names[int(best[row, position])]
            golds.append(set(bio_spans(sentence, gold_tags)))
            guesses.append(set(bio_spans(sentence, predicted)))
    return entity_scores(guesses, golds)


# ---------------------------------------------------------------------------------------------- registry

def _distilbert_spec(name: str, learning_rate: float, description: str) -> PresetSpec:
    """A DistilBERT preset trained one epoch on SST-2 by `_build_distilbert` in the shape DISTILBERT_SHAPES[name]:
    the DistilBERT presets differ only in shape, learning rate and description."""
    return PresetSpec(name, "distilbert", TEXT_CLASSIFICATION, "accuracy",
                      TrainingConfig(micro_batch_size=32, learning_rate=learning_rate, epochs=1.0, warmup_ratio=0.06,
                                     log_every=200, seed=0),
                      _build_distilbert, description)


PRESETS: dict[str, PresetSpec] = {
    spec.name: spec for spec in (
        _distilbert_spec("distilbert-tiny", 1e-3, "DistilBERT 2x128 on SST-2 train; SST-2 dev accuracy"),
        # 1e-3 (distilbert-tiny's rate) left 6 post-LN layers at chance: dev accuracy 0.4954
        _distilbert_spec("distilbert-6l", 3e-4, "DistilBERT 6x128 (DistilBERT's depth, 4 heads) on SST-2 train; "
                         "SST-2 dev accuracy"),
        PresetSpec("vit-tiny", "vit", IMAGE_CLASSIFICATION, "accuracy",
                   TrainingConfig(micro_batch_size=32, learning_rate=1e-3, epochs=25.0, warmup_ratio=0.05,
                                  log_every=200, seed=0),
                   _build_vit, "ViT 4x128 (32x32, patch 8) on sklearn digits; held-out accuracy"),
        PresetSpec("deberta-tiny", "deberta-v2", TOKEN_CLASSIFICATION, "f1",
                   TrainingConfig(micro_batch_size=32, learning_rate=1.5e-3, epochs=3.0, warmup_ratio=0.06,
                                  log_every=200, seed=0),
                   _build_deberta, "DeBERTa-v2 2x128 on CoNLL-2003 train; dev exact-span entity F1"),
    )
}
