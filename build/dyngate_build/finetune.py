"""Fine-tune a text-classification model (a preset, a checkpoint folder or a hub id) for a number of steps, on one
process or many: the entry point DeepSpeed's launcher and torchrun start once per rank.

    python -m dyngate_build.finetune --model distilbert-tiny --steps 20 --out ckpt              # one process
    torchrun --nproc_per_node 2 -m dyngate_build.finetune --model distilbert-tiny --steps 20 --out ckpt
    deepspeed --num_gpus 2 --module dyngate_build.finetune --model distilbert-tiny --steps 20 --out ckpt
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 --master_addr node1 \\
        --module dyngate_build.finetune --model distilbert-tiny --config ds_zero2_bf16.json --steps 500 --out ckpt

Training goes through `dyngate_build.training.train` (the DeepSpeed engine; ZeRO stage and precision from
--zero-stage/--precision or a DeepSpeed JSON given with --config). The launchers set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; torch.distributed runs gloo on CPU and nccl on GPUs.

The same --global-batch-size gives the same training on any number of ranks: optimizer step s takes examples
[s*G, (s+1)*G) of one seeded permutation of the training split, cut into micro-batches of --micro-batch-size;
rank r of W takes the r-th W-th of them, and gradient accumulation makes up the rest (G / (W * micro) micro-
batches per rank and step). Dropout makes ranks draw different masks than one process would; --dropout 0
turns it off where runs must be compared exactly.

Rank 0 writes the checkpoint (`save_pretrained` safetensors + tokenizer + finetune.json with the settings,
world size and the global mean loss of every step) into a temporary folder, renamed to --out at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dyngate_build.errors import ConfigError, DyngateError
from dyngate_build.families import TEXT_CLASSIFICATION
from dyngate_build.training import TrainingConfig, ensure_distributed, train

RESULT_FILE = "finetune.json"


@dataclass
class FinetuneResult:
    """What finetune.json holds: the run's settings, world size and per-step global mean losses."""

    model: str
    steps: int
    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    losses: list[float]
    training: dict


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size, from the launcher's environment (0, 1 without one)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per rank and optimizer step; ConfigError unless the global batch splits evenly."""
    per_step = world_size * micro_batch_size
    if global_batch_size < 1 or micro_batch_size < 1 or global_batch_size % per_step:
        raise ConfigError(f"--global-batch-size {global_batch_size} must be a positive multiple of world size "
                          f"{world_size} x --micro-batch-size {micro_batch_size} = {per_step}; change either")
    return global_batch_size // per_step


def rank_batches(tokenizer, texts: list[str], labels: list[int], steps: int, global_batch_size: int,
                 micro_batch_size: int, rank: int, world: int, seed: int, max_length: int) -> list[dict]:
    """This rank's micro-batches for `steps` optimizer steps, in training order (see the module docstring).

    Each: input_ids, attention_mask (int64, [micro, longest text of the micro-batch]), labels (int64, [micro]).
    """
    needed = steps * global_batch_size
    if len(texts) < needed:
        raise ConfigError(f"the training split has {len(texts)} texts; --steps {steps} x --global-batch-size "
                          f"{global_batch_size} need {needed}; lower either")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:needed].tolist()
    per_rank = global_batch_size // world
    out = []
    for step in range(steps):
        mine = order[step * global_batch_size + rank * per_rank:step * global_batch_size + (rank + 1) * per_rank]
        for start in range(0, per_rank, micro_batch_size):
            chunk = mine[start:start + micro_batch_size]
            encoded = tokenizer([texts[i] for i in chunk], truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt")
            out.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                        "labels": torch.tensor([labels[i] for i in chunk], dtype=torch.long)})
    return out


def finetune(model: str, out: Path, steps: int, global_batch_size: int, micro_batch_size: int,
             training: TrainingConfig, cache_dir: Path, data: str | None = None, dropout: float | None = None,
             log=print) -> FinetuneResult:
    """Fine-tune `model` on this rank's share of the text-classification training split (see the module
    docstring); rank 0 writes the checkpoint to `out`. Returns the run's FinetuneResult on every rank.

    Raises ConfigError (bad settings, not a text-classification model) and SourceError (model not loadable).
    """
    from dyngate_build.data import DataSource, load_text_pairs
    from dyngate_build.sources import load_source

    rank, world = rank_and_world()
    accumulation = accumulation_steps(global_batch_size, micro_batch_size, world)
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ConfigError(f"--dropout {dropout} must be in [0, 1)")
    training = TrainingConfig(**{**training.to_dict(), "micro_batch_size": micro_batch_size,
                                 "gradient_accumulation_steps": accumulation, "max_steps": steps})
    ensure_distributed()
    import deepspeed.comm as dist

    data_source = DataSource.from_setting(data)
    if rank != 0:
        dist.barrier()  # rank 0 trains a missing preset first; the others then read it from the cache
    source = load_source(model, Path(cache_dir), data_source)
    if rank == 0 and world > 1:
        dist.barrier()
    if source.family.task != TEXT_CLASSIFICATION:
        raise ConfigError(f"--model {model!r} is a {source.family.task} model; this entry point fine-tunes "
                          f"{TEXT_CLASSIFICATION} models (e.g. distilbert-tiny)")
    texts, labels, _ = load_text_pairs("train", data_source)
    batches = rank_batches(source.tokenizer, texts, labels, steps, global_batch_size, micro_batch_size, rank,
                           world, training.seed, source.max_length)
    net = source.model
    if dropout is not None:
        for module in net.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
    result = train(net, batches, training, desc=f"finetune rank {rank}/{world}")
    losses = torch.tensor(result.losses, dtype=torch.float64)
    if world > 1:  # each rank's step loss is the mean over its micro-batches: the global mean averages them
        dist.all_reduce(losses)
        losses /= world
    summary = FinetuneResult(model=model, steps=result.steps, global_batch_size=global_batch_size,
                             micro_batch_size=micro_batch_size, gradient_accumulation_steps=accumulation,
                             world_size=world, losses=[round(float(x), 6) for x in losses],
                             training=training.to_dict())
    if rank == 0:
        _save(net, source.tokenizer, summary, Path(out))
        log(f"fine-tuned {model} for {summary.steps} steps on {world} rank(s): loss {summary.losses[0]:.4f} -> "
            f"{summary.losses[-1]:.4f}; checkpoint in {out}")
    if world > 1:
        dist.barrier()  # nobody exits (tearing down the group) before rank 0 has written
    return summary


def _save(model, tokenizer, summary: FinetuneResult, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / RESULT_FILE).write_text(json.dumps(asdict(summary), indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyngate_build.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="preset (distilbert-tiny), checkpoint folder or hub id")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (rank 0)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--global-batch-size", type=int, default=32, help="examples per optimizer step, all ranks")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="examples per forward pass on one rank")
    parser.add_argument("--config", default=None, help="DeepSpeed JSON (ZeRO stage, bf16/fp16, optimizer lr)")
    parser.add_argument("--zero-stage", type=int, default=None, help="ZeRO stage 0-3 (wins over --config)")
    parser.add_argument("--precision", default=None, help="fp32, bf16 or fp16 (wins over --config)")
    parser.add_argument("--learning-rate", type=float, default=None, help="AdamW learning rate (default 5e-5)")
    parser.add_argument("--seed", type=int, default=0, help="data order and initial torch seed")
    parser.add_argument("--dropout", type=float, default=None, help="set every dropout probability (0: off)")
    parser.add_argument("--cache-dir", default=os.environ.get("DYNGATE_CACHE", ".cache"))
    parser.add_argument("--data", default=None, help="data folder or hf:<datasets id> (default: $DYNGATE_DATA)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's launcher
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed, "warmup_ratio": 0.0, "log_every": 10**6}
    if args.zero_stage is not None:
        overrides["zero_stage"] = args.zero_stage
    if args.precision is not None:
        overrides["precision"] = args.precision
    if args.learning_rate is not None or not args.config:
        overrides["learning_rate"] = args.learning_rate if args.learning_rate is not None else 5e-5
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        training = (TrainingConfig.from_json(args.config, **overrides) if args.config
                    else TrainingConfig(**overrides))
        finetune(args.model, Path(args.out), args.steps, args.global_batch_size, args.micro_batch_size, training,
                 Path(args.cache_dir), args.data, args.dropout, log=lambda line: print(line, file=sys.stderr))
    except DyngateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
