"""GPU comparison: PyTorch eager vs TorchScript, FP32 vs FP16, and early exit, with absolute times.

    python scripts/bench_gpu.py --data ../shared/data/sst2/dev.tsv --tokenizer .cache/presets/distilbert-tiny/tokenizer.json

Model: the DistilBERT-base architecture (DistilBertConfig defaults: 6 layers, dim 768), randomly initialised
(no hub here), so accuracy is meaningless and only latency is reported. Inputs: SST-2 dev sentences at
natural length, tokenized with the given tokenizer.json. Each (variant, batch size) cell times the same
batches in one interleaved run (rotating order), with CUDA synchronisation around each call; ms per call.

Early exit uses the project's own scripted TorchScript module (build/early_exit.py) with off-ramps after
every layer. Its ramps are untrained here, so the exit layer is forced by the threshold: 1.0 never exits
(all 6 layers), 0.0 exits at the first ramp (layer 1), and a ramp after layer 3 only shows half the depth.
ONNX Runtime variants run only where onnxruntime has the CUDAExecutionProvider (onnxruntime-gpu).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sentences(path: Path, limit: int) -> list[str]:
    rows = path.read_text().splitlines()[1:]
    return [row.split("\t", 1)[1] for row in rows[:limit]]


def batches(tokenizer_path: Path, texts: list[str], batch_size: int, device: str) -> list[tuple]:
    """Token batches padded to their longest sentence: list of (input_ids, attention_mask) int64 tensors."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(128)
    out = []
    for start in range(0, len(texts) - batch_size + 1, batch_size):
        encodings = tokenizer.encode_batch(texts[start:start + batch_size])
        longest = max(len(e.ids) for e in encodings)
        ids = torch.zeros(batch_size, longest, dtype=torch.long)
        mask = torch.zeros(batch_size, longest, dtype=torch.long)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = torch.tensor(e.ids) % 30522
            mask[row, :len(e.ids)] = 1
        out.append((ids.to(device), mask.to(device)))
    return out


def make_variants(device: str) -> dict:
    """name -> callable(input_ids, attention_mask) for every variant that can run here."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from build.early_exit import export_torchscript as export_early_exit
    from build.early_exit import segment_model
    from build.export import logits_module
    from build.families import family_for

    torch.manual_seed(0)
    family = family_for("distilbert")
    model = DistilBertForSequenceClassification(DistilBertConfig()).eval()
    variants = {}
    fp32 = logits_module(model, family).to(device)
    variants["eager-fp32"] = fp32
    example = (torch.randint(5, 1000, (2, 16), device=device), torch.ones(2, 16, dtype=torch.long, device=device))
    with torch.no_grad():
        variants["torchscript-fp32"] = torch.jit.trace(fp32, example, check_trace=False)
    if device == "cuda":
        import copy

        half = logits_module(copy.deepcopy(model).half(), family).to(device)
        variants["eager-fp16"] = half
        with torch.no_grad():
            variants["torchscript-fp16"] = torch.jit.trace(half, example, check_trace=False)
    tmp = ROOT / ".cache" / "bench_gpu"
    tmp.mkdir(parents=True, exist_ok=True)
    for label, exit_layers in (("every-layer", None), ("layer-3", [3])):
        with torch.device(device):
            segments = segment_model(model, "distilbert", exit_layers)
            path = export_early_exit(segments, tmp / f"early-exit-{label}.pt", "max_prob")
        scripted = torch.jit.load(str(path), map_location=device).eval()
        thresholds = {"never": 1.0, "exit": 0.0}
        for when, value in thresholds.items():
            if label == "layer-3" and when == "never":
                continue
            threshold = torch.tensor([value], device=device)
            name = {"never": "early-exit, never (6 layers)", "exit": "early-exit, exit at layer 1"}[when]
            if label == "layer-3":
                name = "early-exit, exit at layer 3"
            variants[name] = (lambda s, t: (lambda ids, mask: s(ids, mask, t)))(scripted, threshold)
    try:
        import onnxruntime as ort

        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            from build.export import export_onnx

            path = export_onnx(model, family, tmp / "fp32.onnx")
            session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
            variants["onnxruntime-cuda-fp32"] = lambda ids, mask: session.run(
                None, {"input_ids": ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()})
    except ImportError:
        pass
    return variants


def measure(variants: dict, data: list[tuple], device: str, warmup: int = 5) -> dict[str, list[float]]:
    names = list(variants)
    times = {n: [] for n in names}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for ids, mask in data[:warmup]:
            for n in names:
                variants[n](ids, mask)
        sync()
        for i, (ids, mask) in enumerate(data):
            for n in names[i % len(names):] + names[: i % len(names)]:
                sync()
                start = time.perf_counter()
                variants[n](ids, mask)
                sync()
                times[n].append((time.perf_counter() - start) * 1000)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / ".cache" / "presets" / "distilbert-tiny" /
                        "tokenizer.json")
    parser.add_argument("--requests", type=int, default=400, help="sentences per batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="folder for bench_gpu.md and bench_gpu.json")
    args = parser.parse_args(argv)

    device = args.device
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    variants = make_variants(device)
    texts = sentences(args.data, args.requests)
    header = (f"DistilBERT-base architecture (random init), SST-2 dev sentences at natural length, device "
              f"{device} ({gpu}), torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{time.strftime('%Y-%m-%d')}")
    lines = [header, "", "| variant | batch | p50 ms | p90 ms | sentences/s (p50) | × eager-fp32 p50 |",
             "| --- | --- | --- | --- | --- | --- |"]
    results = {"header": header, "rows": []}
    for batch_size in args.batch_sizes:
        data = batches(args.tokenizer, texts, batch_size, device)
        times = measure(variants, data, device)
        base = float(np.median(times["eager-fp32"]))
        for name, values in times.items():
            p50, p90 = float(np.median(values)), float(np.percentile(values, 90))
            lines.append(f"| {name} | {batch_size} | {p50:.3f} | {p90:.3f} | {batch_size * 1000 / p50:.0f} | "
                         f"{p50 / base:.2f} |")
            results["rows"].append({"variant": name, "batch_size": batch_size, "p50_ms": p50, "p90_ms": p90,
                                    "n": len(values)})
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_gpu.md").write_text(table + "\n")
        (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
