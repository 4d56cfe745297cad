"""GPU comparison: PyTorch eager vs TorchScript, FP32 vs FP16, and early exit, with absolute times.

    python scripts/bench_gpu.py --out reports          # on a GPU host; writes reports/bench_gpu.md and .json

Same table code as `make bench` (dyngate_measure.benchmark): every row timed in one interleaved loop per batch size
(rotating order), `--repeats` runs, p50 as the median of per-repeat p50s with min–max, items/s, and the
speed-up against PyTorch eager FP32 (baseline p50 / row p50). CUDA is synchronised around each call.

Model: the DistilBERT-base architecture (DistilBertConfig defaults: 6 layers, dim 768, 12 heads, FFN 3072),
randomly initialised (no hub here), so only latency is reported. Inputs: SST-2 dev sentences at natural
length, tokenized with the distilbert-tiny preset's tokenizer.json, batches padded to their longest sentence;
tokenization is outside the timed call here (tensors already on the device), unlike `make bench`.

Early exit uses the project's own scripted TorchScript module (build/dyngate_build/techniques/early_exit/). Its ramps are untrained
here, so the exit layer is forced by the threshold: 1.0 never exits (all 6 layers) and 0.0 exits at the first
ramp, placed after layer 3 (`--exit-layer`). ONNX Runtime rows run only where onnxruntime has the
CUDAExecutionProvider (onnxruntime-gpu). On a CPU-only machine the script runs the FP32 rows on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyngate_measure.benchmark import Candidate, header_markdown, run_rows, section_markdown  # noqa: E402

EAGER = "eager-fp32"


def sentences(path: Path, limit: int) -> list[str]:
    rows = path.read_text().splitlines()[1:]
    return [row.split("\t", 1)[1] for row in rows[:limit]]


def batches(tokenizer_path: Path, texts: list[str], batch_size: int, requests: int, device: str) -> list[tuple]:
    """`requests` token batches of `batch_size` consecutive sentences (cycling), padded to their longest:
    (input_ids, attention_mask) int64 tensors on `device`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(128)
    out = []
    for i in range(requests):
        group = [texts[(i * batch_size + j) % len(texts)] for j in range(batch_size)]
        encodings = tokenizer.encode_batch(group)
        longest = max(len(e.ids) for e in encodings)
        ids = torch.zeros(batch_size, longest, dtype=torch.long)
        mask = torch.zeros(batch_size, longest, dtype=torch.long)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = torch.tensor(e.ids) % 30522
            mask[row, :len(e.ids)] = 1
        out.append((ids.to(device), mask.to(device)))
    return out


def make_variants(device: str, exit_layer: int) -> dict:
    """name -> callable(input_ids, attention_mask) for every row that can run on `device`."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from dyngate_build.techniques.early_exit.torchscript_export import export_torchscript as export_early_exit
    from dyngate_build.techniques.early_exit.segments import segment_model
    from dyngate_build.export import logits_module
    from dyngate_build.families import family_for

    torch.manual_seed(0)
    family = family_for("distilbert")
    model = DistilBertForSequenceClassification(DistilBertConfig(num_labels=2)).eval()
    variants = {}
    fp32 = logits_module(model, family).to(device)
    variants[EAGER] = fp32
    example = (torch.randint(5, 1000, (2, 16), device=device), torch.ones(2, 16, dtype=torch.long, device=device))
    with torch.no_grad():
        variants["torchscript-fp32"] = torch.jit.trace(fp32, example, check_trace=False)
    if device == "cuda":
        half = logits_module(copy.deepcopy(model).half(), family).to(device)
        variants["eager-fp16"] = half
        with torch.no_grad():
            variants["torchscript-fp16"] = torch.jit.trace(half, example, check_trace=False)
    tmp = ROOT / ".cache" / "bench_gpu"
    tmp.mkdir(parents=True, exist_ok=True)
    with torch.device(device):
        segments = segment_model(model, "distilbert", [exit_layer])
        path = export_early_exit(segments, tmp / f"early-exit-layer-{exit_layer}.pt", "max_prob")
    scripted = torch.jit.load(str(path), map_location=device).eval()
    layers = model.config.n_layers
    for label, value in ((f"early-exit torchscript, never (all {layers} layers)", 1.0),
                         (f"early-exit torchscript, exit at layer {exit_layer}", 0.0)):
        threshold = torch.tensor([value], device=device)
        variants[label] = (lambda s, t: (lambda ids, mask: s(ids, mask, t)))(scripted, threshold)
    try:
        import onnxruntime as ort

        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            from dyngate_build.export import export_onnx

            path = export_onnx(model, family, tmp / "fp32.onnx")
            onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(tmp / "fp16.onnx"))
            for name, graph in (("onnxruntime-cuda-fp32", path), ("onnxruntime-cuda-fp16", tmp / "fp16.onnx")):
                session = ort.InferenceSession(str(graph), providers=["CUDAExecutionProvider"])
                variants[name] = (lambda s: (lambda ids, mask: s.run(
                    None, {"input_ids": ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()})))(session)
    except ImportError:
        pass
    return variants


def synchronised(fn, device: str):
    """`fn(request)` under inference_mode, with CUDA synchronised before and after (the timed span)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call(request):
        ids, mask = request
        sync()
        with torch.inference_mode():
            out = fn(ids, mask)
        sync()
        return out

    return call


def main(argv=None) -> int:
    from dyngate_measure.benchmark import write_bench
    from dyngate_measure.machine import library_versions, machine_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / ".cache" / "presets" / "distilbert-tiny" /
                        "tokenizer.json")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per row, batch size and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--exit-layer", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "reports", help="folder for bench_gpu.md and .json")
    args = parser.parse_args(argv)

    device = args.device
    variants = make_variants(device, args.exit_layer)
    texts = sentences(args.data, args.requests * max(args.batch_sizes))
    requests = {b: batches(args.tokenizer, texts, b, args.requests, device) for b in args.batch_sizes}
    candidates = [Candidate(name, "baseline" if name == EAGER else "dyngate", device, synchronised(fn, device),
                            variant=name) for name, fn in variants.items()]
    rows = run_rows(candidates, requests, args.repeats, args.warmup, [EAGER])
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    section = {"title": f"DistilBERT-base architecture (random init) on {device} ({gpu})", "model": "distilbert-base",
               "kind": "gpu", "metric": None, "baselines": [EAGER], "rows": rows,
               "how": "DistilBertConfig() defaults, randomly initialised (seed 0); tokens on the device before "
                      "timing"}
    versions = library_versions()
    versions["cuda"] = torch.version.cuda or "none"
    result = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "versions": versions,
              "settings": {"requests": args.requests, "repeats": args.repeats, "warmup": args.warmup,
                           "batch_sizes": list(args.batch_sizes), "threads": torch.get_num_threads(),
                           "paths": [device], "data": str(args.data),
                           "span": "the model call on token tensors already on the device (CUDA synchronised)"},
              "sections": [section]}
    write_bench(result, args.out, stem="bench_gpu", title="dyngate GPU bench")
    print("\n".join(header_markdown(result, "dyngate GPU bench")) + "\n" + section_markdown(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
