"""ZeRO report: per-rank memory of parameters, gradients and optimizer state at ZeRO stages 0-3, measured.

    dyngate zero-report [--stages 0,1,2,3] [--steps 24] [--cache-dir .cache] [--data folder]
    make zero-report

The report process trains the `distilbert-tiny` preset (or a checkpoint folder given with --model) once per
stage: it launches `torchrun --nproc_per_node 2` (gloo on CPU, two data-parallel ranks, each on its own
shard of SST-2 train) and each rank fine-tunes through `dyngate_build.training.train` with gradient accumulation 2.
After the backward pass of every micro-batch the training module calls this module's probe with the live
DeepSpeed engine (`train(..., inspect_engine=...)`), which reads what the rank really holds:

- parameters: the storages behind the module's parameters (`p.data`; at stages 1-2 these are views of
  DeepSpeed's flat `bit16_groups_flat` buffer) plus, at stage 3, each parameter's partition `p.ds_tensor`
  (a view of `lp_param_buffer`); a stage-3 parameter that is released has an empty `p.data`.
- gradients: the storages behind `p.grad` plus the engine's partitioned gradient buffers where the stage
  has them: `averaged_gradients`, `all_grad_tensors`, `grads_in_partition`, `ipg_buffer` (stages 1-2) and
  `grad_partitions_flat_buffer` / the per-parameter grad partitions (stage 3).
- optimizer state: every tensor in the wrapped `torch.optim.AdamW`'s `state` (exp_avg, exp_avg_sq, step).
- fp32 master: DeepSpeed's fp32 partition the optimizer steps (`single_partition_of_fp32_groups` at
  stages 1-2, `fp32_partitioned_groups_flat` at stage 3); stage 0 in fp32 steps the module's own weights.

Each tensor is counted by its underlying storage (`untyped_storage().nbytes()`), each storage once, so
views into one flat buffer are not counted twice and alignment padding is. The probe keeps, per category,
the largest value seen over all micro-batches: stage 1 holds full gradients in `p.grad` while it
accumulates and reduce-scatters them at the accumulation boundary, stage 2 reduces them into its partition
during backward, which is the difference between the two. At the accumulation boundary DeepSpeed 0.19.8
builds stage 2's `averaged_gradients` as views of one flat buffer of the WHOLE gradients of the parameters
that overlap the rank's partition, so a parameter straddling the boundary is held whole: on distilbert-tiny
the word embedding is 68% of the model, and the rank whose partition starts inside it holds the full
gradient there (measured: rank 0 0.68x, rank 1 1.0x of stage 0). Stage 3 runs with
`stage3_param_persistence_threshold: 0` (DeepSpeed's default 1e5 keeps every parameter smaller than 100k
elements whole on every rank, which for a 128-wide model is most of them). Peak RSS is the process's
`ru_maxrss`; "RSS growth" is that peak minus the RSS before the engine started (the import of torch,
transformers and DeepSpeed, a few hundred MB, is the same at every stage and dominates a tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dyngate_build.errors import ConfigError
from dyngate_serving.net import free_port

CATEGORIES = ("parameters", "gradients", "optimizer_state", "fp32_master")
GRADIENT_BUFFERS = ("averaged_gradients", "all_grad_tensors", "grads_in_partition", "ipg_buffer",
                    "grad_partitions_flat_buffer", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
MASTER_BUFFERS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
DEFAULT_PRESET = "distilbert-tiny"
TINY = "tiny-random"  # a random DistilBERT of ~130k parameters for tests (no data, no preset)


@dataclass
class RankMemory:
    """Bytes one rank held at one ZeRO stage (largest over the run's micro-batches) and its peak RSS."""

    stage: int
    rank: int
    world_size: int
    parameters: int
    gradients: int
    optimizer_state: int
    fp32_master: int
    peak_rss: int
    rss_growth: int
    steps: int
    final_loss: float
    model_parameters: int
    seconds: float


# ---------------------------------------------------------------------------------------------- measuring

def _tensors(value, depth: int = 0):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return int(sum(seen.values()))


def measure_engine(engine) -> dict[str, int]:
    """Bytes this rank holds now, per category (see the module docstring for what is read)."""
    optimizer = engine.optimizer
    params = list(engine.module.parameters())
    param_tensors = [p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]
    grad_tensors = [p.grad for p in params]
    for name in GRADIENT_BUFFERS:
        grad_tensors += list(_tensors(getattr(optimizer, name, None)))
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the client AdamW; stage 0 is the AdamW
    state = [t for s in inner.state.values() for t in _tensors(s)]
    master = [t for name in MASTER_BUFFERS for t in _tensors(getattr(optimizer, name, None))]
    return {"parameters": storage_bytes(param_tensors), "gradients": storage_bytes(grad_tensors),
            "optimizer_state": storage_bytes(state), "fp32_master": storage_bytes(master)}


class MemoryProbe:
    """`inspect_engine` hook for dyngate_build.training.train: keeps the largest bytes seen per category."""

    def __init__(self):
        self.peak = {name: 0 for name in CATEGORIES}
        self.calls = 0

    def __call__(self, engine, step: int) -> None:
        self.calls += 1
        for name, value in measure_engine(engine).items():
            self.peak[name] = max(self.peak[name], value)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# ---------------------------------------------------------------------------------------------- one rank

def _tiny_model():
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=1000, dim=64, n_layers=2, n_heads=2, hidden_dim=256, max_position_embeddings=64, num_labels=2))


def _tiny_batches(rank: int, count: int, size: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(count):
        ids = torch.randint(5, 1000, (size, 12), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] >= 500).long()})
    return out


def _sst2_batches(checkpoint: Path, data: str | None, rank: int, world: int, count: int, size: int) -> list[dict]:
    """This rank's shard of SST-2 train, tokenized with the checkpoint's tokenizer, padded per batch."""
    import torch
    from tokenizers import Tokenizer

    from dyngate_build.data import DataSource, load_text_pairs

    texts, labels, _ = load_text_pairs("train", DataSource.from_setting(data))
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer.enable_truncation(128)
    pad = tokenizer.token_to_id("[PAD]") or 0
    rows = list(range(rank, len(texts), world))[:count * size]
    if len(rows) < count * size:
        raise ConfigError(f"the training split has {len(texts)} texts; {world} ranks x {count} batches x {size} "
                          f"need {world * count * size}; lower --steps")
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        ids = [e.ids for e in tokenizer.encode_batch([texts[i] for i in chunk])]
        longest = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad] * (longest - len(x)) for x in ids], dtype=torch.long)
        out.append({"input_ids": input_ids, "attention_mask": (input_ids != pad).long(),
                    "labels": torch.tensor([labels[i] for i in chunk], dtype=torch.long)})
    return out


def run_rank(stage: int, model: str, steps: int, micro_batch_size: int, out_dir: Path, data: str | None) -> RankMemory:
    """Inside torchrun: fine-tune at `stage` with the probe, write `rank<r>.json` into `out_dir`."""
    import logging

    from dyngate_build.training import TrainingConfig, train

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = 2
    if model == TINY:
        net = _tiny_model()
        batches = _tiny_batches(rank, steps * accumulation, micro_batch_size)
    else:
        from transformers import AutoModelForSequenceClassification

        net = AutoModelForSequenceClassification.from_pretrained(model)
        batches = _sst2_batches(Path(model), data, rank, world, steps * accumulation, micro_batch_size)
    model_parameters = sum(p.numel() for p in net.parameters())
    config = TrainingConfig(zero_stage=stage, micro_batch_size=micro_batch_size,
                            gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=1e-4,
                            warmup_ratio=0.0, log_every=10**6,
                            deepspeed_extra={"zero_optimization": {"stage3_param_persistence_threshold": 0}}
                            if stage == 3 else {})
    probe = MemoryProbe()
    before = _rss()
    start = time.perf_counter()
    result = train(net, batches, config, desc=f"zero-{stage} rank {rank}", inspect_engine=probe)
    peak = _peak_rss()
    row = RankMemory(stage=stage, rank=rank, world_size=world, **probe.peak, peak_rss=peak,
                     rss_growth=max(0, peak - before), steps=result.steps, final_loss=round(result.final_loss, 4),
                     model_parameters=int(model_parameters), seconds=round(time.perf_counter() - start, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(asdict(row)))
    return row


# ---------------------------------------------------------------------------------------------- launcher

def run_stage(stage: int, model: str, steps: int = 24, micro_batch_size: int = 16, ranks: int = 2,
              data: str | None = None, timeout: float = 300.0, log=print) -> list[RankMemory]:
    """Launch `torchrun --nproc_per_node ranks` for one stage; the rows of every rank, rank order."""
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"stage={stage!r} is not a ZeRO stage; choose from 0, 1, 2, 3")
    with tempfile.TemporaryDirectory(prefix=f"zero{stage}-") as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                   "-m", "dyngate_measure.zero_report", "--worker", "--stage", str(stage), "--model", model,
                   "--steps", str(steps), "--micro-batch-size", str(micro_batch_size), "--out", tmp]
        if data:
            command += ["--data", data]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            lines = (done.stdout + done.stderr).splitlines()
            # a rank's own last words (a C++ abort prints "terminate called ... what(): ..." long before torchrun's
            # summary, which is all a plain tail shows: seen once in CI as SIGABRT in both ranks, cause unknown)
            causes = [line for line in lines if any(mark in line for mark in ("terminate called", "what()", "Error:"))
                      and "ChildFailedError" not in line][:12]
            tail = "\n".join(causes + ["..."] + lines[-30:] if causes else lines[-30:])
            raise RuntimeError(f"torchrun for ZeRO stage {stage} failed (exit {done.returncode}):\n{tail}")
        rows = [RankMemory(**json.loads((Path(tmp) / f"rank{r}.json").read_text())) for r in range(ranks)]
    log(f"stage {stage}: {ranks} ranks, {rows[0].steps} steps, {max(r.seconds for r in rows):.1f} s")
    return rows


def _mb(value: int) -> str:
    return f"{value / 2**20:8.2f}"


def format_table(rows: list[RankMemory], title: str = "") -> str:
    """The report: one line per (stage, rank), MiB, plus each category's ratio to stage 0."""
    header = (f"{'stage':>5} {'rank':>4} {'params MiB':>10} {'grads MiB':>10} {'optim MiB':>10} {'master MiB':>10} "
              f"{'peak RSS MiB':>12} {'RSS growth':>10} {'loss':>7}")
    lines = [title, header, "-" * len(header)] if title else [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.stage:>5} {r.rank:>4} {_mb(r.parameters):>10} {_mb(r.gradients):>10} "
                     f"{_mb(r.optimizer_state):>10} {_mb(r.fp32_master):>10} {_mb(r.peak_rss):>12} "
                     f"{_mb(r.rss_growth):>10} {r.final_loss:>7.4f}")
    base = {r.rank: r for r in rows if r.stage == 0}
    if base:
        lines.append("")
        lines.append("per-rank bytes relative to stage 0 (rank 0): params / grads / optimizer state")
        for r in rows:
            if r.rank != 0 or r.stage == 0:
                continue
            b = base[0]
            ratio = [x / y if y else float("nan") for x, y in ((r.parameters, b.parameters),
                                                               (r.gradients, b.gradients),
                                                               (r.optimizer_state, b.optimizer_state))]
            lines.append(f"  stage {r.stage}: {ratio[0]:.2f} / {ratio[1]:.2f} / {ratio[2]:.2f}")
    return "\n".join(lines)


def run_report(stages=(0, 1, 2, 3), model: str | None = None, cache_dir: str | Path = ".cache",
               data: str | None = None, steps: int = 24, micro_batch_size: int = 16, ranks: int = 2,
               log=print) -> list[RankMemory]:
    """Every stage's rows; `model` None = the distilbert-tiny preset (trained into `cache_dir` if absent)."""
    if ranks < 2:
        raise ConfigError(f"ranks={ranks}: ZeRO only partitions across 2 or more ranks; use --ranks 2")
    if not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"steps={steps!r} must be an integer >= 2 (optimizer state exists after the first step)")
    if model is None or model == DEFAULT_PRESET:
        from dyngate_build.data import DataSource
        from dyngate_build.presets import ensure_preset

        model = str(ensure_preset(DEFAULT_PRESET, Path(cache_dir), DataSource.from_setting(data)))
    elif model != TINY and not (Path(model) / "config.json").is_file():
        raise ConfigError(f"--model {model!r} is neither {DEFAULT_PRESET!r}, {TINY!r} nor a checkpoint folder "
                          f"with config.json")
    rows: list[RankMemory] = []
    for stage in stages:
        rows += run_stage(int(stage), model, steps, micro_batch_size, ranks, data, log=log)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dyngate zero-report`."""
    parser.add_argument("--stages", default="0,1,2,3", help="comma-separated ZeRO stages")
    parser.add_argument("--model", default=DEFAULT_PRESET,
                        help=f"{DEFAULT_PRESET} (preset), a checkpoint folder, or {TINY} (random, no data)")
    parser.add_argument("--cache-dir", default=os.environ.get("DYNGATE_CACHE", ".cache"))
    parser.add_argument("--data", default=None, help="data folder (default: $DYNGATE_DATA, else ../shared/data)")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per stage (2 micro-batches each)")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")


def run_from_args(args) -> int:
    """Measure the stages the parsed options name and print the table; ConfigError for a bad option."""
    try:
        stages = [int(s) for s in args.stages.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--stages {args.stages!r} must be comma-separated integers from 0-3") from None
    rows = run_report(stages, args.model, args.cache_dir, args.data, args.steps, args.micro_batch_size,
                      args.ranks, log=lambda m: print(m, file=sys.stderr, flush=True))
    params = rows[0].model_parameters if rows else 0
    title = (f"ZeRO per-rank memory, {args.model} ({params:,} parameters, fp32, AdamW), {args.ranks} ranks "
             f"(torchrun, gloo, CPU), {args.steps} steps x 2 micro-batches of {args.micro_batch_size}; "
             f"bytes read from the engine (largest over the run)")
    print(format_table(rows, title))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dyngate zero-report`'s options, plus the hidden `--worker` mode torchrun starts each rank in."""
    parser = argparse.ArgumentParser(prog="python -m dyngate_measure.zero_report", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_rank(args.stage, args.model, args.steps, args.micro_batch_size, Path(args.out), args.data)
        return 0
    try:
        return run_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
