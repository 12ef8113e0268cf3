"""Ray job entrypoint for the train stage (a thin wrapper over ``lvm_ray.train.train``).

    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/ecgs --run s3://bucket/runs/r1 \
        --preset lvm-ai-2021 --num-workers 8 --use-gpu

Inside a Ray job RAY_ADDRESS is set and the job joins that cluster; run locally it starts an
embedded Ray. Re-running the same command resumes the run. Prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lvm_ray.presets import DEFAULT_PRESET, preset_names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset URL (lvm-ray synth / ingest output)")
    parser.add_argument("--run", required=True, help="run directory URL (checkpoints, metrics, model.pt)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=preset_names())
    parser.add_argument("--target", default=None, help="numeric (regression) or 0/1 (binary) column; default lv_mass_g")
    parser.add_argument("--task", choices=["regression", "binary"], default=None, help="default: inferred")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (falls back to CPU if none)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size; default: the preset's")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--split-column", default=None, help="split by this column (e.g. strat_fold)")
    parser.add_argument("--val-values", nargs="*", default=[], help="split-column values for validation")
    parser.add_argument("--test-values", nargs="*", default=[], help="split-column values held out for test")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="hash split: share of patients in test")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="hash split: share of the rest in val")
    parser.add_argument("--max-failures", type=int, default=3)
    parser.add_argument("--cache-inputs", action="store_true", help="keep preprocessed inputs in the object store")
    parser.add_argument("--no-test", action="store_true", help="skip evaluating the test split at the end")
    parser.add_argument("--overwrite", action="store_true", help="start RUN over instead of resuming it")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray address (auto, ray://...)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lvm_ray.train import train

    result = train(
        args.data,
        args.run,
        preset=args.preset,
        target=args.target,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        max_epochs=args.max_epochs,
        address=args.address,
        task=args.task,
        batch_size=args.batch_size,
        lr=args.lr,
        split_column=args.split_column,
        val_values=args.val_values,
        test_values=args.test_values,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        cache_inputs=args.cache_inputs,
        evaluate_test=not args.no_test,
        overwrite=args.overwrite,
    )
    json.dump(result.to_dict(), sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
