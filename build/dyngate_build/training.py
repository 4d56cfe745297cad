"""The one training module of dyngate, on the DeepSpeed engine.

Everything that fine-tunes (offline presets, early-exit heads, pruning recovery, knowledge distillation)
calls `train(model, batches, config, loss_fn)`. The ZeRO stage and the precision come from
`TrainingConfig` (or a user's DeepSpeed JSON through `TrainingConfig.from_json`).

On a machine without a launcher, one process is a world of one: the rendezvous variables are set when
absent and torch.distributed starts with gloo. The optimizer is a client `torch.optim.AdamW`, so no
DeepSpeed C++ op is compiled; in a single process the shared-memory allreduce op (a ~60 s compile the
first time, useless for one rank) is skipped too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import torch

from dyngate_build.errors import ConfigError, check_choice, check_range

log = logging.getLogger("dyngate.training")

PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)
Batch = dict  # dict[str, torch.Tensor], "labels" included unless loss_fn needs none


@dataclass
class TrainingConfig:
    """Settings of one training run.

    zero_stage: ZeRO stage 0-3. precision: "fp32", "bf16" or "fp16" (fp16 needs CUDA).
    micro_batch_size: examples per forward pass (the caller's batches should hold this many).
    gradient_accumulation_steps: micro-batches per optimizer step.
    learning_rate, weight_decay: AdamW settings. warmup_ratio: share of steps with linear warm-up, then
    linear decay to 0. epochs: passes over `batches` (fractions allowed); max_steps: optimizer steps, wins
    over epochs when set. gradient_clipping: max gradient norm (0 = off). seed: torch seed before training.
    log_every: log the mean loss every this many optimizer steps. deepspeed_extra: further DeepSpeed config
    keys, merged last (e.g. zero_optimization offload settings from a user JSON).
    """

    zero_stage: int = 0
    precision: str = "fp32"
    micro_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    epochs: float = 1.0
    max_steps: int | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    gradient_clipping: float = 1.0
    seed: int = 0
    log_every: int = 50
    deepspeed_extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("zero_stage", self.zero_stage, ZERO_STAGES)
        check_choice("precision", self.precision, PRECISIONS)
        if self.precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("precision='fp16' needs a CUDA GPU (DeepSpeed's fp16 loss scaling runs on GPU); "
                              "no GPU is visible: use precision='bf16' or 'fp32'")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        check_range("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        check_range("gradient_clipping", self.gradient_clipping, 0.0, math.inf)
        if self.max_steps is None:
            check_range("epochs", self.epochs, 0.0, 10_000.0, low_open=True)
        elif not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps!r} must be an integer >= 1, or None to train `epochs`")
        if not isinstance(self.deepspeed_extra, dict):
            raise ConfigError(f"deepspeed_extra={self.deepspeed_extra!r} must be a dict of DeepSpeed config keys")

    def to_deepspeed_config(self) -> dict:
        """The DeepSpeed config dict of this run (optimizer and scheduler are client objects, not in it)."""
        config = {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_clipping": self.gradient_clipping,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        return _merge(config, self.deepspeed_extra)

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "TrainingConfig":
        """Read a DeepSpeed JSON config; keyword `overrides` win over it.

        Known keys map onto fields (micro batch, accumulation, clipping, zero stage, bf16/fp16, optimizer lr
        and weight_decay, scheduler warmup share is not read); the rest of `zero_optimization` and other
        engine keys are kept in `deepspeed_extra`. `optimizer`/`scheduler` sections become the client AdamW
        and linear schedule (no compiled DeepSpeed optimizer); `train_batch_size` is derived, so dropped.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"DeepSpeed config {path} cannot be read as JSON ({e}); fix the file or drop the "
                              f"option") from None
        if not isinstance(data, dict):
            raise ConfigError(f"DeepSpeed config {path} must hold a JSON object, not {type(data).__name__}")
        values: dict = {}
        data = dict(data)
        if "train_micro_batch_size_per_gpu" in data:
            values["micro_batch_size"] = int(data.pop("train_micro_batch_size_per_gpu"))
        if "gradient_accumulation_steps" in data:
            values["gradient_accumulation_steps"] = int(data.pop("gradient_accumulation_steps"))
        if "gradient_clipping" in data:
            values["gradient_clipping"] = float(data.pop("gradient_clipping"))
        data.pop("train_batch_size", None)
        zero = dict(data.pop("zero_optimization", {}) or {})
        if "stage" in zero:
            values["zero_stage"] = int(zero.pop("stage"))
        for name in ("bf16", "fp16"):
            section = data.pop(name, None) or {}
            if section.get("enabled"):
                values["precision"] = name
        params = (data.pop("optimizer", None) or {}).get("params", {})
        if "lr" in params:
            values["learning_rate"] = float(params["lr"])
        if "weight_decay" in params:
            values["weight_decay"] = float(params["weight_decay"])
        data.pop("scheduler", None)
        extra = dict(data)
        if zero:
            extra["zero_optimization"] = zero
        values["deepspeed_extra"] = extra
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown TrainingConfig field(s) {unknown}; known: {', '.join(sorted(known))}")
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingResult:
    """steps: optimizer steps taken; losses: mean loss of each step; seconds: wall time incl. engine set-up."""

    steps: int
    final_loss: float
    losses: list[float]
    seconds: float


def train(model: torch.nn.Module, batches: "Callable[[], Iterable[Batch]] | Iterable[Batch]",
          config: TrainingConfig, loss_fn: "Callable[[torch.nn.Module, Batch], torch.Tensor] | None" = None,
          desc: str = "train", inspect_engine: "Callable[[object, int], None] | None" = None,
          param_groups: "list[dict] | None" = None) -> TrainingResult:
    """Train `model` in place with DeepSpeed; afterwards it is a plain module in eval mode with fp32 weights.

    batches: micro-batches (dicts of tensors); a callable is called once per epoch (to reshuffle), an
    iterable is iterated once per epoch. Floating tensors are cast to the engine's precision.
    loss_fn(model, batch) -> scalar loss; default `model(**batch).loss`. The engine's module is passed, so a
    distillation loss can call a frozen teacher itself.
    inspect_engine(engine, step): optional hook, called after the backward pass of every micro-batch, before
    `engine.step()`, while gradients, optimizer state and ZeRO partitions are live; `step` is the 1-based
    optimizer step the micro-batch belongs to (`engine.is_gradient_accumulation_boundary()` tells whether
    it is the last). gateway/dyngate_measure/zero_report.py measures per-rank memory there.
    param_groups: optional AdamW parameter groups ({"params": [...], "lr": ...}; a group without "lr" uses
    `config.learning_rate`) that must cover every trainable parameter exactly once, e.g. a small learning
    rate for a pretrained backbone and a larger one for fresh heads; the schedule scales every group alike.
    """
    import deepspeed
    from tqdm.auto import tqdm

    start = time.perf_counter()
    loss_fn = loss_fn or _default_loss
    total_steps = _total_steps(batches, config)
    ensure_distributed()
    torch.manual_seed(config.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (all requires_grad=False)")
    groups = params if param_groups is None else _checked_groups(param_groups, params)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(warmup, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config.to_deepspeed_config())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision, torch.float32)
    losses: list[float] = []
    pending: list[float] = []
    micro = 0
    bar = tqdm(total=total_steps, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    try:
        while len(losses) < total_steps:
            epoch_had_batches = False
            for batch in (batches() if callable(batches) else batches):
                epoch_had_batches = True
                batch = {k: _to_device(v, engine.device, dtype) for k, v in batch.items()}
                loss = loss_fn(engine, batch)
                engine.backward(loss)
                if inspect_engine is not None:
                    inspect_engine(engine, len(losses) + 1)
                engine.step()
                pending.append(float(loss.detach().float()))
                micro += 1
                if micro % config.gradient_accumulation_steps:
                    continue
                losses.append(sum(pending) / len(pending))
                pending = []
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if len(losses) % config.log_every == 0 or len(losses) == total_steps:
                    recent = losses[-config.log_every:]
                    log.info("%s step %d/%d loss %.4f", desc, len(losses), total_steps, sum(recent) / len(recent))
                if len(losses) >= total_steps:
                    break
            if not epoch_had_batches:
                raise ConfigError(f"{desc}: `batches` yielded no batch; give a non-empty iterable or a callable "
                                  f"returning a fresh iterable each epoch")
    finally:
        bar.close()
    _restore_plain_module(engine, model)
    seconds = time.perf_counter() - start
    return TrainingResult(steps=len(losses), final_loss=losses[-1] if losses else float("nan"), losses=losses,
                          seconds=seconds)


# ---------------------------------------------------------------------------------------------- internals

def ensure_distributed() -> None:
    """Start torch.distributed through DeepSpeed (gloo) for a single process, unless already started."""
    import deepspeed
    import deepspeed.comm as dist

    if dist.is_initialized():
        return
    defaults = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if os.environ["WORLD_SIZE"] == "1":
        _skip_shared_memory_comm_op()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    if os.environ["WORLD_SIZE"] != "1":
        dist.barrier()  # every rank has opened its peers' shared-memory buffers (DeepSpeed does it in its init)
        _release_shared_memory_name()


def _release_shared_memory_name() -> None:
    """Unlink this rank's /dev/shm name of DeepSpeed's shared-memory allreduce buffer. DeepSpeed's CPU op
    (ShareMemCommBuilder, ops/csrc/cpu/comm/shm.cpp) creates deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (66 MB) per rank and never unlinks it: every multi-rank run left 132 MB in /dev/shm (found: 42 files, 2.4 GB,
    after a day of runs on one machine), the space Triton's python backend needs. The ranks' mappings stay valid
    until they exit; only the name goes. Call once every rank has opened its peers' buffers."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_"
            f"{os.environ['RANK']}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def _skip_shared_memory_comm_op() -> None:
    """One rank needs no shared-memory allreduce; mark its op incompatible so it is not compiled (~60 s)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checked_groups(param_groups: list[dict], trainable: list) -> list[dict]:
    """`param_groups` restricted to trainable parameters; ConfigError unless they cover each exactly once."""
    groups, seen = [], set()
    for group in param_groups:
        if not isinstance(group, dict) or "params" not in group:
            raise ConfigError(f"param_groups entries must be dicts with 'params' (and optionally 'lr'); got {group!r}")
        params = [p for p in group["params"] if p.requires_grad]
        twice = [p for p in params if id(p) in seen]
        if twice:
            raise ConfigError(f"{len(twice)} parameter(s) appear in more than one of param_groups; list each once")
        seen.update(id(p) for p in params)
        if params:
            groups.append({**group, "params": params})
    missing = sum(id(p) not in seen for p in trainable)
    if missing:
        raise ConfigError(f"{missing} trainable parameter(s) are in none of param_groups; add them to a group "
                          f"or set requires_grad=False on them")
    return groups


def _default_loss(model, batch: Batch) -> torch.Tensor:
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ConfigError("the model returned no loss: put 'labels' in each batch or pass loss_fn(model, batch)")
    return loss


def _to_device(value, device, dtype):
    if not isinstance(value, torch.Tensor):
        return value
    value = value.to(device)
    return value.to(dtype) if value.is_floating_point() else value


def _total_steps(batches, config: TrainingConfig) -> int:
    if config.max_steps is not None:
        return config.max_steps
    epoch = batches() if callable(batches) else batches
    try:
        per_epoch = len(epoch)
    except TypeError:
        raise ConfigError("batches has no length, so `epochs` cannot be counted; set max_steps") from None
    steps = math.ceil(config.epochs * per_epoch / config.gradient_accumulation_steps)
    if steps < 1:
        raise ConfigError(f"{per_epoch} batches x epochs={config.epochs} make no optimizer step; "
                          f"give more batches or set max_steps")
    return steps


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def _restore_plain_module(engine, model: torch.nn.Module) -> None:
    """Write the full fp32 master weights into `model`, drop the engine's hooks, set eval mode."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    full = {}
    for name, param in module.named_parameters():
        value = safe_get_full_fp32_param(param) if param.requires_grad else None
        if value is None:
            if hasattr(param, "ds_tensor"):
                import deepspeed
                with deepspeed.zero.GatheredParameters([param]):
                    value = param.detach().clone()
            else:
                value = param.detach()
        full[name] = value.detach().float().cpu().clone()
    stage3 = any(hasattr(p, "ds_tensor") for p in module.parameters())
    engine.destroy()
    for name, param in module.named_parameters():
        param.data = full[name].to(param.device)
        if stage3:
            for attr in [a for a in vars(param) if a.startswith("ds_")]:
                delattr(param, attr)
    module.float()
    module.eval()
    if module is not model:
        model.load_state_dict(module.state_dict())
        model.eval()


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
