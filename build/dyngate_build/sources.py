"""Load the model a build starts from: an offline preset, a local checkpoint folder, or a Hugging Face hub id.

Checkpoints load through `from_pretrained` with safetensors preferred and `trust_remote_code` never enabled.
Everything is checked before the build writes anything: a missing or unreadable checkpoint, an unsupported
`model_type`, or a text model without a fast tokenizer raises SourceError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dyngate_build.errors import ConfigError, SourceError
from dyngate_build.families import FamilySpec, family_for
from dyngate_build.repository import model_name_for
from dyngate_build.runtime import ImageSpec


@dataclass
class Source:
    """A loaded source model.

    Attributes:
        name: repository-safe model name ("distilbert-tiny", "org--model").
        location: the preset name, folder or hub id it came from.
        checkpoint: folder or hub id `from_pretrained` read.
        model: the HF model, FP32, eval mode, on CPU.
        family: its FamilySpec.
        tokenizer: fast tokenizer (text families) or None.
        image_spec: dyngate_build.runtime.ImageSpec (image families) or None.
        labels: class names by logit index.
    """

    name: str
    location: str
    checkpoint: str
    model: torch.nn.Module
    family: FamilySpec
    tokenizer: object | None
    image_spec: ImageSpec | None
    labels: list[str]

    @property
    def max_length(self) -> int:
        """Longest token sequence the model takes (position embeddings, tokenizer limit, 512)."""
        limit = getattr(self.model.config, "max_position_embeddings", 512)
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", limit) or limit
        return int(min(limit, tokenizer_limit, 512))


PRESET_TYPO_CUTOFF = 0.85  # difflib ratio above which a name that is no preset reads as a misspelt one


def check_location(location: str) -> str:
    """What `location` names, checked without training, loading or any network: "preset", "folder" or "hub".

    A name that is no preset and no existing path but close to a preset's name (difflib ratio ≥
    PRESET_TYPO_CUTOFF, case ignored: `distilbert-tinyy`, `vit-tin`, `DistilBERT-tiny`) is a misspelt preset, not a
    hub id: ConfigError naming the closest preset and the known ones, before from_pretrained tries the hub. Other
    names without a path prefix are hub ids (`owner/name`, or a legacy one such as `distilbert-base-uncased`).
    Raises SourceError for a path that is a file, a folder without config.json, or a missing folder.
    """
    import difflib

    from dyngate_build.presets import PRESETS

    if location in PRESETS:
        return "preset"
    path = Path(location).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"checkpoint {location!r} is a file; give the folder that holds config.json")
        if not (path / "config.json").is_file():
            raise SourceError(f"checkpoint folder {location!r} has no config.json; is it a save_pretrained folder?")
        return "folder"
    if location.startswith((".", "/", "~")) or os.sep in location.strip("/").replace("/", "", 1):
        raise SourceError(f"checkpoint folder {location!r} does not exist")
    close = difflib.get_close_matches(location.lower(), list(PRESETS), n=1, cutoff=PRESET_TYPO_CUTOFF)
    if close:
        raise ConfigError(f"model={location!r} is not a known preset (did you mean {close[0]!r}?); known presets: "
                          f"{', '.join(sorted(PRESETS))}. Fix --model (PRESETS= for make build / make demo); a "
                          "checkpoint folder must exist, a hub id reads owner/name")
    return "hub"  # from_pretrained says whether it can be fetched


def resolve_checkpoint(location: str, cache_dir: Path, data_source=None) -> str:
    """Folder or hub id for `location` (checked by `check_location`): presets are trained (or reused) in
    `cache_dir/presets/<name>`."""
    from dyngate_build.presets import ensure_preset

    kind = check_location(location)
    if kind == "preset":
        return str(ensure_preset(location, Path(cache_dir), data_source))
    return str(Path(location).expanduser()) if kind == "folder" else location


def _image_spec(processor) -> ImageSpec:
    size = processor.size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    resample = getattr(processor.resample, "name", None) or {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(
        int(processor.resample), "bilinear")
    return ImageSpec(size=(height, width), mean=tuple(processor.image_mean), std=tuple(processor.image_std),
                     rescale_factor=float(processor.rescale_factor), resample=resample.lower())


def load_source(location: str, cache_dir: Path, data_source=None) -> Source:
    """Load `location` (preset name, local folder or hub id) as a Source; raises SourceError on any problem."""
    import transformers

    checkpoint = resolve_checkpoint(location, cache_dir, data_source)
    try:
        config = transformers.AutoConfig.from_pretrained(checkpoint, trust_remote_code=False)
    except Exception as e:
        raise SourceError(f"cannot read the config of {location!r}: {type(e).__name__}: {e}") from None
    family = family_for(config.model_type)
    try:
        model_class = getattr(transformers, family.hf_class)
        model = model_class.from_pretrained(checkpoint, trust_remote_code=False, torch_dtype=torch.float32)
    except Exception as e:
        raise SourceError(f"cannot load {family.hf_class} from {location!r}: {type(e).__name__}: {e}") from None
    model.eval()
    tokenizer = image_spec = None
    try:
        if family.is_text:
            tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, use_fast=True, trust_remote_code=False)
            if not getattr(tokenizer, "is_fast", False):
                raise SourceError(f"{location!r} has no fast tokenizer (tokenizer.json); dyngate serves with the "
                                  "`tokenizers` library and needs one")
        else:
            image_spec = _image_spec(transformers.AutoImageProcessor.from_pretrained(checkpoint))
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"cannot load the preprocessor of {location!r}: {type(e).__name__}: {e}") from None
    labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    return Source(name=model_name_for(location), location=location, checkpoint=checkpoint, model=model,
                  family=family, tokenizer=tokenizer, image_spec=image_spec, labels=labels)
