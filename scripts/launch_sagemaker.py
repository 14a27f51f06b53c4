"""Launch dogbreed on SageMaker: ``python scripts/launch_sagemaker.py {train,tune,deploy,analytics} [overrides]``.

    python scripts/launch_sagemaker.py train sagemaker.role=arn:aws:iam::123456789012:role/SageMaker \
        sagemaker.bucket=my-bucket data.source=s3://my-bucket/dogImages
    python scripts/launch_sagemaker.py tune sagemaker.tuner.strategy=Hyperband sagemaker.tuner.max_jobs=20
    python scripts/launch_sagemaker.py deploy sagemaker.deploy.training_job=dogbreed-2026-01-01-00-00-00-000
    python scripts/launch_sagemaker.py analytics sagemaker.analytics.tuning_job=dogbreed-260101-0000

Needs ``pip install -e ".[sagemaker]"``; the logic lives in :mod:`dogbreed.sagemaker.launcher`.
"""

from __future__ import annotations

import logging
import sys

from dogbreed.config import TuneConfigError
from dogbreed.data import DataError
from dogbreed.sagemaker.launcher import LaunchError, main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        print(main(sys.argv[1:]))
    except (LaunchError, TuneConfigError, DataError) as err:
        logging.getLogger("launch_sagemaker").error("%s", err)
        sys.exit(2)
