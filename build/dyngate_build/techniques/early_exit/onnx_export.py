"""ONNX export of early exit: one graph per segment in a folder with `early_exit.json`
(`runtime.EarlyExitOnnxEngine` chains them, per-sample exit)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dyngate_build.errors import ExportError
from dyngate_build.export import ONNX_OPSET, quiet_exporters
from dyngate_build.techniques.early_exit.segments import Segments

MANIFEST = "early_exit.json"


def _export(module: nn.Module, args: tuple, names: list[str], shapes: dict, path: Path,
            outputs: list[str] | None = None) -> None:
    try:
        with quiet_exporters(), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=ONNX_OPSET, input_names=names,
                                        output_names=outputs or ["output"], dynamic_shapes=shapes, optimize=True)
            program.save(str(path), external_data=False)
    except Exception as e:
        raise ExportError(f"ONNX export of early-exit segment {path.name} failed: {type(e).__name__}: {e}") from e


def _dims(segments: Segments, names) -> dict:
    """torch.export dynamic shapes of `names` from `segments.axes` (one Dim object per axis name)."""
    dims = {"batch": torch.export.Dim("batch", min=1, max=1024),
            "sequence": torch.export.Dim("sequence", min=1, max=4096)}
    return {name: ({axis: dims[kind] for axis, kind in segments.axes[name].items()} or None) for name in names}


def export_onnx_segments(segments: Segments, folder: Path, criterion: str, default_threshold: float,
                         task: str) -> Path:
    """Write one ONNX graph per segment into `folder` plus `early_exit.json` (what the engine chains).

    embeddings: graph inputs `embed_inputs` -> ("hidden", *state); layer_<i>: `layer_inputs` -> hidden;
    ramp_<k>, head: hidden -> logits. The manifest names the state and the shared (unbatched) tensors.
    `task` must agree with the segments (token-classification <-> per-token ramps).
    """
    if (task == "token-classification") != segments.token_level:
        raise ExportError(f"task {task!r} does not match the {segments.model_type} segments "
                          f"({'per-token' if segments.token_level else 'per-sequence'} ramps)")
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        env = segments.start(segments.example)
    embed_in = list(segments.embed_inputs)
    _export(segments.embed, tuple(env[n] for n in embed_in), embed_in, _dims(segments, embed_in),
            folder / "embeddings.onnx", outputs=["hidden", *segments.state])
    files: dict[str, str] = {"embeddings": "embeddings.onnx"}
    layer_in = list(segments.layer_inputs)
    for i, layer in enumerate(segments.layers, start=1):
        _export(layer, tuple(env[n] for n in layer_in), layer_in, _dims(segments, layer_in), folder / f"layer_{i}.onnx")
        files[f"layer_{i}"] = f"layer_{i}.onnx"
    hidden = (env["hidden"],)
    for position, ramp in segments.ramps.items():
        _export(ramp, hidden, ["hidden"], _dims(segments, ["hidden"]), folder / f"ramp_{position}.onnx")
        files[f"ramp_{position}"] = f"ramp_{position}.onnx"
    _export(segments.head, hidden, ["hidden"], _dims(segments, ["hidden"]), folder / "head.onnx")
    files["head"] = "head.onnx"
    manifest = {"inputs": list(segments.inputs), "layers": len(segments.layers),
                "exit_layers": sorted(segments.ramps), "criterion": criterion,
                "default_threshold": default_threshold, "level": "token" if segments.token_level else "sequence",
                "num_labels": segments.num_labels, "state": list(segments.state),
                "shared": list(segments.shared), "segments": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder
