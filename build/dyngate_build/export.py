"""Export a Hugging Face model to ONNX (torch.onnx, dynamo exporter) and TorchScript (torch.jit.trace).

Both take the family's input names and dynamic axes from `dyngate_build.families`. The graphs return the logits
only: float32 [batch, num_labels] for classification, [batch, sequence, num_labels] for token tasks.
Checking an export against the PyTorch reference lives in `dyngate_build.evaluate.agreement`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from dyngate_build.errors import ExportError
from dyngate_build.families import FamilySpec

ONNX_OPSET = 18  # >=17 keeps LayerNormalization one op (FP16 eps underflow trap, DESIGN.md)
MAX_BATCH = 1024


class LogitsOnly(torch.nn.Module):
    """Wrap an HF model so forward(*graph inputs) returns the logits tensor alone.

    The signature names the inputs (input_ids, attention_mask | pixel_values), which both exporters and
    Triton's libtorch backend use as tensor names.
    """

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs))).logits


class TextLogits(LogitsOnly):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class ImageLogits(LogitsOnly):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def logits_module(model: torch.nn.Module, family: FamilySpec) -> LogitsOnly:
    """The model wrapped with named graph inputs, in eval mode."""
    wrapper = TextLogits if family.is_text else ImageLogits
    return wrapper(model, family.onnx_inputs).eval()


def example_inputs(model: torch.nn.Module, family: FamilySpec, batch: int = 2, sequence: int = 8):
    """Example graph inputs (tuple of tensors) with batch and sequence ≥2, so no axis is frozen at 1."""
    config = model.config
    if family.is_text:
        ids = torch.randint(5, max(6, config.vocab_size), (batch, sequence), dtype=torch.long)
        return ids, torch.ones(batch, sequence, dtype=torch.long)
    size = config.image_size
    return (torch.randn(batch, config.num_channels, size, size),)


def dynamic_shapes(model: torch.nn.Module, family: FamilySpec) -> dict:
    """torch.export dynamic shapes of the graph inputs from `family.dynamic_axes` (one Dim per axis name:
    batch 1..MAX_BATCH, sequence 1..the model's max_position_embeddings)."""
    dims = {"batch": torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    if any("sequence" in family.dynamic_axes[name].values() for name in family.onnx_inputs):
        dims["sequence"] = torch.export.Dim("sequence", min=1, max=int(model.config.max_position_embeddings))
    return {name: {axis: dims[kind] for axis, kind in family.dynamic_axes[name].items()}
            for name in family.onnx_inputs}


# Loggers that speak during an export and say nothing a dyngate user can act on; quiet_exporters raises them to
# ERROR for the export only:
# - torch: the exporters' own progress notes.
# - onnxscript.optimizer._constant_folding: torch.onnx's optimize step warns "Skipping constant folding for op
#   LayerNormalization with multiple outputs" (DeBERTa); the op is kept as it is, which is correct.
# - transformers.modeling_utils: torch.jit.trace probes every submodule with hasattr() for exported methods, which
#   reads a base model's `loss_function` property, and transformers warns "`loss_type=None` was set in the config
#   but it is unrecognized" (DeBERTa); no loss is computed in an export.
EXPORT_QUIET_LOGGERS = ("torch", "onnxscript.optimizer._constant_folding", "transformers.modeling_utils")


@contextlib.contextmanager
def quiet_exporters():
    """Silence the exporters' progress prints and warnings and the EXPORT_QUIET_LOGGERS' notes below ERROR for the
    duration of the export; the loggers' levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in EXPORT_QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def export_onnx(model: torch.nn.Module, family: FamilySpec, path: Path) -> Path:
    """Export `model` to ONNX at `path` (opset 18, dynamic batch and sequence axes, weights inside the file).

    Raises ExportError with the exporter's message when torch.onnx cannot export the model.
    """
    module = logits_module(model, family)
    try:
        with quiet_exporters(), torch.no_grad():
            program = torch.onnx.export(
                module, example_inputs(model, family), dynamo=True, opset_version=ONNX_OPSET,
                input_names=list(family.onnx_inputs), output_names=["logits"],
                dynamic_shapes=dynamic_shapes(model, family), optimize=True)
            program.save(str(path), external_data=False)
    except Exception as e:
        raise ExportError(f"ONNX export of {family.model_type} failed: {type(e).__name__}: {e}") from e
    return path


def export_torchscript(model: torch.nn.Module, family: FamilySpec, path: Path) -> Path:
    """Trace `model` to TorchScript at `path`; the traced graph takes the graph inputs positionally.

    Raises ExportError when tracing fails.
    """
    module = logits_module(model, family)
    try:
        with quiet_exporters(), torch.no_grad():
            traced = torch.jit.trace(module, example_inputs(model, family), check_trace=False)
            traced.save(str(path))
    except Exception as e:
        raise ExportError(f"TorchScript export of {family.model_type} failed: {type(e).__name__}: {e}") from e
    return path
