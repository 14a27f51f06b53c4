"""usage: dogbreed-sagemaker {train,tune,deploy,transform,analytics} [hydra overrides]
       (or python -m dogbreed.sagemaker; python scripts/launch_sagemaker.py in a checkout)

    dogbreed-sagemaker train sagemaker.role=arn:aws:iam::123456789012:role/SageMaker \\
        sagemaker.bucket=my-bucket data.source=s3://my-bucket/dogImages
    dogbreed-sagemaker tune sagemaker.tuner.strategy=Hyperband sagemaker.tuner.max_jobs=20
    dogbreed-sagemaker deploy sagemaker.deploy.training_job=dogbreed-2026-01-01-00-00-00-000
    dogbreed-sagemaker transform sagemaker.deploy.training_job=dogbreed-2026-01-01-00-00-00-000 \\
        sagemaker.transform.input=s3://my-bucket/photos
    dogbreed-sagemaker analytics sagemaker.analytics.tuning_job=dogbreed-260101-0000

sagemaker.*, tune.* and hparams_search.* set up the job (conf/sagemaker/default.yaml lists them); every other
override (experiment=demo, model.lr=3e-4, ...) becomes a job hyperparameter that the container turns back into
the same override. Needs pip install -e ".[sagemaker]" (SageMaker Python SDK v3).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from dogbreed.config import TuneConfigError
from dogbreed.data.layout import DataError
from dogbreed.sagemaker.launcher import LaunchError, launch

log = logging.getLogger("dogbreed.sagemaker")


def main(argv: Sequence[str] | None = None) -> None:
    """Run one launcher verb; a configuration mistake ends with one clear line and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        print(launch(argv))
    except (LaunchError, TuneConfigError, DataError) as err:
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
