"""Ray job entrypoint: cohort-scale batch scoring (the `lvm-ray score` command, same flags).

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/score.py --data s3://bucket/ecg --checkpoint s3://bucket/runs/r1 \
        --out s3://bucket/preds --address auto
"""

import sys

from lvm_ray.cli import app

if __name__ == "__main__":
    app(["score", *sys.argv[1:]], prog_name="jobs/score.py")
