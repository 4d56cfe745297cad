"""Where labelled data comes from, and the examples a variant is trained and evaluated on.

The data source is a setting (`--data` flag or `DYNGATE_DATA` environment variable):
- a local folder laid out like `../shared/data` (`sst2/{train,dev}.tsv`, `conll2003/{train,dev}.txt`,
  optionally `images/{train,dev}/<class>/*.png`), or the same files directly in the folder
  (`train.tsv`, `dev.txt`, `train/<class>/...`);
- a single local file: TSV/CSV/JSONL with text and label columns, or a CoNLL file (used for every split);
- `hf:<datasets id>[:<config>]`: a Hugging Face datasets id, read with the `datasets` library (optional
  dependency, needs the hub).
Nothing set: `../shared/data` beside the repository root. Images with no image folder in the source come
from scikit-learn's 8x8 digits (split 80/20 with seed 0).

`Example.raw` is exactly what a Triton client sends: UTF-8 text (NER: the words joined by single spaces) or
PNG bytes. `Example.target` is a class id, or for NER the gold entity spans `(type, start_char, end_char)`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyngate_build.errors import ConfigError, SourceError, check_choice
from dyngate_build.families import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION

ENV_VAR = "DYNGATE_DATA"
FLAG = "--data"
HF_PREFIX = "hf:"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FOLDER = REPO_ROOT.parent / "shared" / "data"

SPLITS = ("train", "dev")
TASKS = (TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, IMAGE_CLASSIFICATION)
SST2_LABELS = ["negative", "positive"]
DIGIT_LABELS = [str(i) for i in range(10)]
ENTITY_ORDER = ("PER", "ORG", "LOC", "MISC")
CONLL_LABELS = ["O"] + [f"{bi}-{kind}" for kind in ENTITY_ORDER for bi in ("B", "I")]
DIGITS_SEED = 0
DIGITS_TRAIN_FRACTION = 0.8

TEXT_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
CONLL_SUFFIXES = (".txt", ".conll", ".conll2003", ".bio", ".iob")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TEXT_COLUMNS = ("sentence", "text", "content", "review")
LABEL_COLUMNS = ("label", "labels", "target", "class")
HF_SPLITS = {"train": ("train",), "dev": ("validation", "dev", "valid", "test")}


@dataclass(frozen=True)
class Example:
    """One request as a client sends it (`raw`) and its gold answer (`target`)."""

    raw: bytes
    target: object


@dataclass(frozen=True)
class DataSource:
    """Where data comes from.

    kind: "folder", "file" or "hf"; location: the folder/file path or the datasets id (with an optional
    ":config"); origin: which setting chose it ("--data", "DYNGATE_DATA" or "default"), named in errors.
    """

    kind: str
    location: str
    origin: str = "default"

    @classmethod
    def from_setting(cls, value: str | None = None) -> "DataSource":
        """Build a source from the `--data` value, else `DYNGATE_DATA`, else `../shared/data`."""
        origin = FLAG
        if not value:
            value, origin = os.environ.get(ENV_VAR) or None, ENV_VAR
        if not value:
            if DEFAULT_FOLDER.is_dir():
                return cls("folder", str(DEFAULT_FOLDER), "default")
            raise SourceError(
                f"no data source: set {FLAG} <folder|file|hf:<datasets id>> or the environment variable "
                f"{ENV_VAR}; the default folder {DEFAULT_FOLDER} does not exist")
        value = value.strip()
        if value.startswith(HF_PREFIX):
            dataset_id = value[len(HF_PREFIX):].strip()
            if not dataset_id:
                raise ConfigError(f"{origin}={value!r} names no dataset; write hf:<datasets id>, e.g. hf:stanfordnlp/sst2")
            return cls("hf", dataset_id, origin)
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        if path.is_dir():
            return cls("folder", str(path.resolve()), origin)
        if path.is_file():
            return cls("file", str(path.resolve()), origin)
        raise SourceError(f"{origin}={value!r}: {path} is neither a folder nor a file; "
                          f"point {FLAG} or {ENV_VAR} at a data folder, a data file or hf:<datasets id>")

    def describe(self) -> str:
        return f"{HF_PREFIX}{self.location}" if self.kind == "hf" else self.location

    def _missing(self, what: str, tried: list[Path]) -> SourceError:
        paths = ", ".join(str(p) for p in tried)
        return SourceError(f"{what} not found in data source {self.describe()!r} (from {self.origin}); "
                           f"looked for: {paths}. Change {FLAG} or {ENV_VAR}")


# ---------------------------------------------------------------------------------------------- public API

def load_examples(task: str, split: str, source: DataSource,
                  limit: int | None = None) -> tuple[list[Example], list[str]]:
    """Examples of `task` in `split` ("train" | "dev") as client requests with gold targets, and label names."""
    check_choice("task", task, TASKS)
    _check_split(split)
    if task == TEXT_CLASSIFICATION:
        texts, labels, names = load_text_pairs(split, source, limit)
        return [Example(t.encode("utf-8"), int(y)) for t, y in zip(texts, labels)], names
    if task == TOKEN_CLASSIFICATION:
        words, tags, names = load_token_sentences(split, source, limit)
        return [Example(" ".join(w).encode("utf-8"), bio_spans(w, t)) for w, t in zip(words, tags)], names
    folder = _image_folder(split, source)
    if folder is None:
        images, labels = load_digit_images(split, limit)
        return [Example(encode_png(image), int(y)) for image, y in zip(images, labels)], list(DIGIT_LABELS)
    files, labels, names = _image_files(folder, source, limit)
    return [Example(_read_bytes(f, source), y) for f, y in zip(files, labels)], names


def load_text_pairs(split: str, source: DataSource,
                    limit: int | None = None) -> tuple[list[str], list[int], list[str]]:
    """(texts, class ids, label names) of a text classification split."""
    _check_split(split)
    if source.kind == "hf":
        return _hf_text_pairs(split, source, limit)
    path = _find_file(source, split, "sst2", TEXT_SUFFIXES, "text classification file")
    rows = _read_table(path, source)
    texts, raw_labels = _text_columns(rows, path, source)
    labels, names = _label_ids(raw_labels)
    return _limited(texts, limit), _limited(labels, limit), names


def load_token_sentences(split: str, source: DataSource,
                         limit: int | None = None) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(words per sentence, BIO tags per sentence, tag list with "O" first) of a NER split."""
    _check_split(split)
    if source.kind == "hf":
        return _hf_token_sentences(split, source, limit)
    path = _find_file(source, split, "conll2003", CONLL_SUFFIXES, "CoNLL file")
    words, tags = _read_conll(path, source)
    return _limited(words, limit), _limited(tags, limit), tag_list(tags)


def load_digit_images(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 [N, 8, 8] (0..255) and int64 labels; 80/20 split with seed 0."""
    _check_split(split)
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(DIGITS_SEED).permutation(len(digits.target))
    cut = int(round(DIGITS_TRAIN_FRACTION * len(order)))
    chosen = order[:cut] if split == "train" else order[cut:]
    if limit is not None:
        chosen = chosen[:limit]
    images = np.clip(np.round(digits.images[chosen] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target[chosen].astype(np.int64)


def encode_png(image: np.ndarray) -> bytes:
    """Grayscale uint8 [H, W] -> PNG bytes (PIL mode "L"), as a client would send it."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def bio_spans(words: list[str], tags: list[str]) -> list[tuple[str, int, int]]:
    """Entity spans (type, start_char, end_char) over `" ".join(words)` from BIO tags.

    B-X opens an entity; I-X continues an open X entity and opens one otherwise (as the serving runtime
    reads predictions); O closes.
    """
    spans: list[list] = []
    open_kind = None
    position = 0
    for word, tag in zip(words, tags):
        start, end = position, position + len(word)
        position = end + 1
        prefix, _, kind = tag.partition("-")
        if prefix == "I" and kind and open_kind == kind:
            spans[-1][2] = end
        elif prefix in ("B", "I") and kind:
            spans.append([kind, start, end])
            open_kind = kind
        else:
            open_kind = None
    return [tuple(s) for s in spans]


def tag_list(tags: list[list[str]]) -> list[str]:
    """The fixed BIO tag order: "O", then B-/I- of PER, ORG, LOC, MISC, then other types sorted."""
    kinds = {t.partition("-")[2] for sentence in tags for t in sentence if t != "O"}
    extra = sorted(kinds - set(ENTITY_ORDER))
    return ["O"] + [f"{bi}-{kind}" for kind in (*ENTITY_ORDER, *extra) for bi in ("B", "I")]


# ---------------------------------------------------------------------------------------------- local files

def _check_split(split: str) -> None:
    check_choice("split", split, SPLITS)


def _limited(items: list, limit: int | None) -> list:
    if limit is not None and limit < 0:
        raise ConfigError(f"limit={limit!r} must be a positive number of examples or None for all")
    return items if limit is None else items[:limit]


def _find_file(source: DataSource, split: str, subfolder: str, suffixes: tuple[str, ...], what: str) -> Path:
    if source.kind == "file":
        path = Path(source.location)
        if path.suffix.lower() not in suffixes:
            raise SourceError(f"{what}: {path} has suffix {path.suffix!r}; expected one of {', '.join(suffixes)}. "
                              f"Change {FLAG} or {ENV_VAR}")
        return path
    root = Path(source.location)
    tried = [folder / f"{split}{suffix}" for folder in (root / subfolder, root) for suffix in suffixes]
    for path in tried:
        if path.is_file():
            return path
    raise source._missing(f"{what} for split {split!r}", tried)


def _read_text(path: Path, source: DataSource) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read {path} ({e}); fix the file or change {FLAG} or {ENV_VAR} "
                          f"(now {source.describe()!r} from {source.origin})") from None


def _read_bytes(path: Path, source: DataSource) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read {path} ({e}); change {FLAG} or {ENV_VAR}") from None


def _read_table(path: Path, source: DataSource) -> list[dict]:
    text = _read_text(path, source)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}:{number} is not a JSON object ({e.msg})") from None
    else:
        delimiter = "\t" if suffix == ".tsv" else ","
        rows = list(csv.DictReader(io.StringIO(text), delimiter=delimiter, quoting=csv.QUOTE_NONE
                                   if delimiter == "\t" else csv.QUOTE_MINIMAL))
    if not rows:
        raise SourceError(f"{path} holds no examples; change {FLAG} or {ENV_VAR}")
    return rows


def _text_columns(rows: list[dict], path: Path, source: DataSource) -> tuple[list[str], list]:
    columns = list(rows[0])
    text_col = next((c for c in TEXT_COLUMNS if c in columns), None)
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    if text_col is None or label_col is None:
        raise SourceError(f"{path} has columns {columns}; need a text column ({', '.join(TEXT_COLUMNS)}) "
                          f"and a label column ({', '.join(LABEL_COLUMNS)})")
    texts, labels = [], []
    for number, row in enumerate(rows, 2):
        text, label = row.get(text_col), row.get(label_col)
        if text is None or label is None or str(label).strip() == "":
            raise SourceError(f"{path}: row {number} lacks {text_col!r} or {label_col!r}")
        texts.append(str(text))
        labels.append(label)
    return texts, labels


def _label_ids(raw: list) -> tuple[list[int], list[str]]:
    """Integer labels 0..K-1 keep their ids (binary: SST-2's names); other labels are sorted names."""
    try:
        ids = [int(str(v).strip()) for v in raw]
    except ValueError:
        names = sorted({str(v).strip() for v in raw})
        index = {n: i for i, n in enumerate(names)}
        return [index[str(v).strip()] for v in raw], names
    if min(ids) < 0:
        raise SourceError(f"labels must be class ids >= 0 or names; found {min(ids)}")
    count = max(ids) + 1
    return ids, list(SST2_LABELS) if count <= 2 else [str(i) for i in range(count)]


def _read_conll(path: Path, source: DataSource) -> tuple[list[list[str]], list[list[str]]]:
    """CoNLL: one `token ... TAG` a line (first and last columns), blank line between sentences."""
    words: list[list[str]] = []
    tags: list[list[str]] = []
    current_w: list[str] = []
    current_t: list[str] = []
    for number, line in enumerate(_read_text(path, source).splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if current_w:
                words.append(current_w)
                tags.append(current_t)
                current_w, current_t = [], []
            continue
        if len(parts) < 2:
            raise SourceError(f"{path}:{number}: expected 'token TAG', got {line!r}")
        tag = parts[-1]
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise SourceError(f"{path}:{number}: tag {tag!r} is not BIO (O, B-X, I-X)")
        current_w.append(parts[0])
        current_t.append(tag)
    if current_w:
        words.append(current_w)
        tags.append(current_t)
    if not words:
        raise SourceError(f"{path} holds no sentences; change {FLAG} or {ENV_VAR}")
    return words, tags


def _image_folder(split: str, source: DataSource) -> Path | None:
    """The folder of class subfolders for `split`, or None when the source has no images (use digits)."""
    if source.kind == "hf":
        return None
    if source.kind == "file":
        return None
    root = Path(source.location)
    for folder in (root / "images" / split, root / split):
        if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()):
            return folder
    return None


def _image_files(folder: Path, source: DataSource, limit: int | None) -> tuple[list[Path], list[int], list[str]]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files, labels = [], []
    for index, name in enumerate(names):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(index)
    if not files:
        raise SourceError(f"{folder} has class folders {names} but no images ({', '.join(IMAGE_SUFFIXES)})")
    return _limited(files, limit), _limited(labels, limit), names


# ---------------------------------------------------------------------------------------------- datasets ids

def _hf_load(split: str, source: DataSource):
    try:
        import datasets
    except ImportError:
        raise SourceError(f"data source {source.describe()!r} needs the `datasets` library and a reachable "
                          f"Hugging Face hub: pip install datasets, or point {FLAG}/{ENV_VAR} at a local "
                          f"folder or file") from None
    dataset_id, _, config = source.location.partition(":")
    try:
        splits = datasets.load_dataset(dataset_id, config or None)
    except Exception as e:  # network, unknown id, ...: many exception types
        raise SourceError(f"cannot load {source.describe()!r} ({type(e).__name__}: {e}); the hub must be "
                          f"reachable, or point {FLAG}/{ENV_VAR} at a local folder or file") from None
    for name in HF_SPLITS[split]:
        if name in splits:
            return splits[name]
    raise SourceError(f"{source.describe()!r} has splits {list(splits)}; none of {HF_SPLITS[split]} for {split!r}")


def _feature_names(feature) -> list[str] | None:
    names = getattr(feature, "names", None)
    inner = getattr(feature, "feature", None)
    return names if names is not None else (getattr(inner, "names", None) if inner is not None else None)


def _hf_text_pairs(split: str, source: DataSource, limit: int | None):
    data = _hf_load(split, source)
    text_col = next((c for c in TEXT_COLUMNS if c in data.column_names), None)
    label_col = next((c for c in LABEL_COLUMNS if c in data.column_names), None)
    if text_col is None or label_col is None:
        raise SourceError(f"{source.describe()!r} has columns {data.column_names}; need text and label columns")
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    names = _feature_names(data.features[label_col])
    texts = [str(t) for t in data[text_col]]
    if names is None:
        labels, names = _label_ids(list(data[label_col]))
    else:
        labels = [int(v) for v in data[label_col]]
    if not texts:
        raise SourceError(f"{source.describe()!r} split {split!r} holds no examples")
    return texts, labels, list(names)


def _hf_token_sentences(split: str, source: DataSource, limit: int | None):
    data = _hf_load(split, source)
    if "tokens" not in data.column_names:
        raise SourceError(f"{source.describe()!r} has columns {data.column_names}; need 'tokens' and 'ner_tags'")
    tag_col = next((c for c in ("ner_tags", "tags", "labels") if c in data.column_names), None)
    if tag_col is None:
        raise SourceError(f"{source.describe()!r} has columns {data.column_names}; need a 'ner_tags' column")
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    names = _feature_names(data.features[tag_col])
    words = [list(w) for w in data["tokens"]]
    tags = [[names[t] if names is not None else str(t) for t in row] for row in data[tag_col]]
    keep = [i for i, w in enumerate(words) if w]
    words, tags = [words[i] for i in keep], [tags[i] for i in keep]
    if not words:
        raise SourceError(f"{source.describe()!r} split {split!r} holds no sentences")
    return words, tags, tag_list(tags)
