"""Ray job entrypoint: training (the `lvm-ray train` command, same flags; --help lists them).

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/train.py \\
        --data s3://bucket/ecg --run s3://bucket/runs/r1 --preset lvm-ai-2021 --num-workers 32 --use-gpu --address auto

Re-submitting the same command resumes the run from its latest checkpoint.
"""

import sys

from lvm_ray.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]], prog_name="jobs/train.py")
