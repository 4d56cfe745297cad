"""Early exit, frozen vs joint ramp training, on one preset in one run: the curve of each, side by side.

    .venv/bin/python scripts/early_exit_training.py --model distilbert-tiny --data ../shared/data

Builds the `early-exit` variant (ONNX segments) once per training setting on the same build context (same
training split, same dev split, same FP32 reference) and prints, per setting, the curve threshold -> metric,
mean layers, p50 and the default threshold, plus the never-exit top-1 agreement with the FP32 reference
(1.0 for frozen; a jointly trained backbone is a different model). `--json PATH` writes everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "frozen": {"training": "frozen"},
    "joint-depth": {"training": "joint", "joint_weights": "depth"},
    "joint-uniform": {"training": "joint", "joint_weights": "uniform"},
}


def main(argv=None) -> int:
    from dyngate_build.data import DataSource, load_examples
    from dyngate_build.evaluate import agreement, run_predictor, task_metric
    from dyngate_build.pipeline import CALIBRATION_EXAMPLES
    from dyngate_build.variant_folder import reference_predictor
    from dyngate_build.runtime import Predictor
    from dyngate_build.sources import load_source
    from dyngate_build.techniques import BuildContext, get_technique, make_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="distilbert-tiny")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    p.add_argument("--eval-limit", type=int, default=1000, help="dev examples (the tuning split of the curve)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="an early-exit option for every setting (JSON value), e.g. epochs=10")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    common = {}
    for item in args.option:
        name, _, value = item.partition("=")
        try:
            common[name] = json.loads(value)
        except ValueError:
            common[name] = value
    chosen = [s for s in args.settings.split(",") if s]
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    configs = {s: make_config("early-exit", {**common, **SETTINGS[s]}) for s in chosen}

    data = DataSource.from_setting(args.data)
    source = load_source(args.model, Path(args.cache_dir), data)
    task = source.family.task
    dev, _ = load_examples(task, "dev", data, limit=args.eval_limit)
    calibration, _ = load_examples(task, "train", data, limit=CALIBRATION_EXAMPLES)
    results = {}
    with tempfile.TemporaryDirectory(prefix="dyngate-ee-") as tmp:
        reference = reference_predictor(source, Path(tmp), 0)
        context = BuildContext(source=source, work_dir=Path(tmp), calibration=calibration, reference=reference,
                               dev=dev)
        raws = [ex.raw for ex in dev]
        ref_predictions = run_predictor(reference, raws)
        ref_metric = task_metric(task, ref_predictions, dev, source.labels)
        print(f"{source.name}: FP32 reference {ref_metric.name} {ref_metric.value:.4f} on {len(dev)} dev examples")
        for setting, config in configs.items():
            variant = get_technique("early-exit").apply(context, config)
            folder = Path(tmp) / "early-exit-measure"
            never = run_predictor(Predictor(str(folder)), raws, options={"exit_threshold": 1.0})
            agree = agreement(never, ref_predictions)
            report = variant.report
            results[setting] = {"params": variant.params, "ramp_training": report["ramp_training"],
                                "curve": report["curve"], "at_default": report["at_default"],
                                "default_threshold": report["default_threshold"],
                                "never_exit_vs_fp32": {"top1": round(agree.top1, 4),
                                                       "max_abs_logit": round(agree.max_abs_logit, 4)},
                                **({"joint": report["joint"]} if "joint" in report else {})}
            _print(setting, results[setting], report["metric"])
    if args.json:
        Path(args.json).write_text(json.dumps({"model": source.name, "reference": ref_metric.value,
                                               "results": results}, indent=2))
    return 0


def _print(setting: str, result: dict, metric: str) -> None:
    training = result["ramp_training"]
    print(f"\n== {setting}: {training['steps']} steps, final loss {training['final_loss']}, {training['seconds']} s; "
          f"never-exit vs FP32 top-1 {result['never_exit_vs_fp32']['top1']:.2%}; "
          f"default threshold {result['default_threshold']:g}")
    print(f"  {'threshold':>9} {metric:>9} {'layers':>7} {'p50 ms':>7}  exits")
    for row in result["curve"]:
        print(f"  {row['threshold']:>9.2f} {row[metric]:>9.4f} {row['mean_layers']:>7.3f} {row['p50_ms']:>7.3f}  "
              f"{row['exits']}")


if __name__ == "__main__":
    raise SystemExit(main())
