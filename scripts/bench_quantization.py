"""Benchmark the quantized ONNX variants on the DistilBERT-base architecture (issue 3's numbers).

DistilBertConfig defaults (DistilBERT-base: 6 layers, dim 768), randomly initialised (no hub needed: latency
and size do not depend on the weights' values), SST-2 dev sentences at natural length, batch 1, 2 threads.
FP32 ONNX, int8-dynamic, zeroquant-w8a8 (MatMulInteger and, for comparison, MatMulNBits 8-bit) and
zeroquant-w4a8 run interleaved in one loop (each sentence through every graph, order rotated) so machine
load hits them alike. Prints p50/p90 latency and size on disk, each relative to FP32.

    python scripts/bench_quantization.py [--sentences 200] [--threads 2] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--tokenizer", default=None,
                        help="folder with tokenizer.json (default: the distilbert-tiny preset, else /tmp/ckpt-db)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from build.data import DataSource, load_examples
    from build.export import export_onnx
    from build.families import family_for
    from build.techniques.int8_dynamic import quantize_dynamic_int8
    from build.techniques.zeroquant import quantize_matmul_nbits

    candidates = [args.tokenizer] if args.tokenizer else [str(ROOT / ".cache/presets/distilbert-tiny"), "/tmp/ckpt-db"]
    folder = next((c for c in candidates if (Path(c) / "tokenizer.json").exists()), None)
    if folder is None:
        sys.exit(f"no tokenizer.json in {candidates}; pass --tokenizer")
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(512)
    examples, _ = load_examples("text-classification", "dev", DataSource.from_setting(args.data),
                                limit=args.sentences)
    encodings = [tokenizer.encode(ex.raw.decode()) for ex in examples]
    feeds = [{"input_ids": np.asarray([e.ids], dtype=np.int64),
              "attention_mask": np.ones((1, len(e.ids)), dtype=np.int64)} for e in encodings]
    lengths = [len(e.ids) for e in encodings]

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(num_labels=2)).eval()
    with tempfile.TemporaryDirectory(prefix="dyngate-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        fp32 = export_onnx(model, family_for("distilbert"), tmp / "fp32.onnx")
        graphs = {
            "fp32": fp32,
            "int8-dynamic": quantize_dynamic_int8(fp32, tmp / "int8-dynamic.onnx"),
            "zeroquant-w8a8": quantize_dynamic_int8(fp32, tmp / "w8a8.onnx"),
            "zeroquant-w8a8 (MatMulNBits 8-bit)": quantize_matmul_nbits(fp32, tmp / "w8a8-nbits.onnx", 8,
                                                                        args.group_size),
            "zeroquant-w4a8": quantize_matmul_nbits(fp32, tmp / "w4a8.onnx", 4, args.group_size),
        }
        print(f"export + quantization: {time.perf_counter() - t0:.0f} s; tokenizer: {folder}; "
              f"{len(feeds)} SST-2 dev sentences, tokens median {statistics.median(lengths):.0f} "
              f"(min {min(lengths)}, max {max(lengths)}); batch 1, {args.threads} threads")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        sessions = {n: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                    for n, p in graphs.items()}
        names = list(sessions)
        times = {n: [] for n in names}
        for feed in feeds[:5]:
            for n in names:
                sessions[n].run(None, feed)
        for i, feed in enumerate(feeds):
            order = names[i % len(names):] + names[: i % len(names)]
            for n in order:
                start = time.perf_counter()
                sessions[n].run(None, feed)
                times[n].append((time.perf_counter() - start) * 1e3)
        sizes = {n: p.stat().st_size for n, p in graphs.items()}
    p50 = {n: float(np.percentile(t, 50)) for n, t in times.items()}
    print(f"\n{'variant':<36}{'MB':>9}{'× fp32':>8}{'p50 ms':>9}{'p90 ms':>9}{'× fp32':>8}")
    for n in names:
        print(f"{n:<36}{sizes[n] / 1e6:9.1f}{sizes[n] / sizes['fp32']:8.2f}{p50[n]:9.2f}"
              f"{np.percentile(times[n], 90):9.2f}{p50[n] / p50['fp32']:8.2f}")


if __name__ == "__main__":
    main()
