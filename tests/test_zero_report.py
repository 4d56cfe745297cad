"""ZeRO report: 2 real ranks (torchrun, gloo) on a tiny random DistilBERT; bytes read from the live engine.

Stage 0 keeps everything whole on each rank; stage 1 partitions the optimizer state, stage 2 the gradients
too, stage 3 the parameters too. The ratios are asserted with a margin for DeepSpeed's alignment padding
and small buffers; no timing is asserted.
"""

from __future__ import annotations

import pytest

from dyngate_build.errors import ConfigError
from dyngate_measure.zero_report import TINY, format_table, run_report


@pytest.fixture(scope="module")
def rows():
    return run_report(stages=(0, 1, 2, 3), model=TINY, steps=3, micro_batch_size=8, log=lambda *_: None)


def _at(rows, stage):
    found = sorted((r for r in rows if r.stage == stage), key=lambda r: r.rank)
    assert [r.rank for r in found] == [0, 1] and all(r.world_size == 2 for r in found)
    return found


def test_stage0_holds_everything_whole(rows):
    for r in _at(rows, 0):
        full = r.model_parameters * 4  # fp32
        assert r.parameters == pytest.approx(full, rel=0.02)
        assert r.gradients == pytest.approx(full, rel=0.02)
        assert r.optimizer_state == pytest.approx(2 * full, rel=0.02)  # AdamW exp_avg + exp_avg_sq
        assert r.steps == 3 and r.peak_rss > 0


def test_stage1_halves_optimizer_state_stage3_halves_parameters(rows):
    base = {r.rank: r for r in _at(rows, 0)}
    for r in _at(rows, 1):
        assert r.optimizer_state / base[r.rank].optimizer_state == pytest.approx(0.5, abs=0.05)
        assert r.parameters == pytest.approx(base[r.rank].parameters, rel=0.02)  # params stay whole
    for r in _at(rows, 2):
        assert r.optimizer_state / base[r.rank].optimizer_state == pytest.approx(0.5, abs=0.05)
        assert r.gradients / base[r.rank].gradients < 0.75  # partitioned during backward
    for r in _at(rows, 3):
        assert r.parameters / base[r.rank].parameters == pytest.approx(0.5, abs=0.05)
        assert r.gradients / base[r.rank].gradients == pytest.approx(0.5, abs=0.05)
        assert r.optimizer_state / base[r.rank].optimizer_state == pytest.approx(0.5, abs=0.05)
    # the same data and seed give the same training at every stage
    losses = {r.stage: r.final_loss for r in rows if r.rank == 0}
    assert max(losses.values()) - min(losses.values()) < 1e-2
    table = format_table(rows)
    assert "stage 3: 0.5" in table and "peak RSS" in table


@pytest.mark.parametrize("kwargs, message", [({"ranks": 1}, "ranks"), ({"steps": 1}, "steps"),
                                             ({"model": "/nonexistent"}, "checkpoint")])
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        run_report(**{"stages": (0,), "model": TINY, **kwargs})
