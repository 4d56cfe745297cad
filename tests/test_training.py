"""dyngate_build.training: DeepSpeed engine in one process, ZeRO stages 0-3, configs checked, fp32 module back."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from dyngate_build.errors import ConfigError
from dyngate_build.training import TrainingConfig, TrainingResult, train


def tiny_model() -> DistilBertForSequenceClassification:
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=2))


def tiny_batches() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (16, 7), generator=g)
    labels = (ids[:, 0] >= 22).long()
    return [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8]), "labels": labels[i:i + 8]}
            for i in (0, 8)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_lower_the_loss_and_return_a_plain_fp32_module(stage):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainingConfig(zero_stage=stage, micro_batch_size=8, learning_rate=1e-2, max_steps=12, warmup_ratio=0)
    result = train(model, tiny_batches(), config)
    assert isinstance(result, TrainingResult) and result.steps == 12 and len(result.losses) == 12
    assert result.final_loss < result.losses[0] * 0.7
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert "pre_classifier.weight" in changed and "distilbert.embeddings.word_embeddings.weight" in changed
    assert not model.training
    assert all(p.dtype == torch.float32 and p.numel() == before[name].numel()
               for name, p in model.named_parameters())
    with torch.inference_mode():
        logits = model(**{k: v for k, v in tiny_batches()[0].items() if k != "labels"}).logits
    assert logits.shape == (8, 2) and torch.isfinite(logits).all()


def test_bf16_epochs_accumulation_and_custom_loss():
    model = tiny_model()
    calls = []

    def loss_fn(engine, batch):
        calls.append(batch["input_ids"].shape[0])
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])

    batches = tiny_batches()
    config = TrainingConfig(precision="bf16", micro_batch_size=8, gradient_accumulation_steps=2, epochs=3,
                            learning_rate=1e-2)
    result = train(model, lambda: batches, config, loss_fn=loss_fn)
    assert result.steps == 3 and len(calls) == 6
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("field, value, message", [
    ("zero_stage", 4, "zero_stage"), ("precision", "int8", "precision"), ("micro_batch_size", 0, "micro_batch_size"),
    ("learning_rate", 0.0, "learning_rate"), ("warmup_ratio", 1.0, "warmup_ratio"), ("epochs", 0, "epochs"),
    ("max_steps", 0, "max_steps"), ("gradient_accumulation_steps", 1.5, "gradient_accumulation_steps")])
def test_bad_settings_raise_config_error(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainingConfig(**{field: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed with CUDA")
def test_fp16_without_gpu_names_the_fix():
    with pytest.raises(ConfigError, match="bf16"):
        TrainingConfig(precision="fp16")


def test_deepspeed_json_and_overrides(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 2, "overlap_comm": False}, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.05}}, "gradient_clipping": 0.5}))
    config = TrainingConfig.from_json(path, max_steps=7)
    assert (config.zero_stage, config.precision, config.micro_batch_size, config.gradient_accumulation_steps,
            config.learning_rate, config.weight_decay, config.max_steps) == (2, "bf16", 4, 2, 3e-4, 0.05, 7)
    ds = config.to_deepspeed_config()
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert ds["bf16"]["enabled"] and "optimizer" not in ds and "train_batch_size" not in ds
    with pytest.raises(ConfigError, match="unknown TrainingConfig"):
        TrainingConfig.from_json(path, stage=1)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="broken.json"):
        TrainingConfig.from_json(broken)


def test_empty_batches_and_missing_labels():
    with pytest.raises(ConfigError, match="no optimizer step|no batch"):
        train(tiny_model(), [], TrainingConfig(micro_batch_size=8))
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in tiny_batches()]
    with pytest.raises(ConfigError, match="labels"):
        train(tiny_model(), no_labels, TrainingConfig(micro_batch_size=8, max_steps=1))
