"""Launch dogbreed on SageMaker from a checkout: ``python scripts/launch_sagemaker.py VERB [overrides]``.

VERB is one of ``train``, ``tune``, ``deploy``, ``transform`` and ``analytics``.

The same command as ``dogbreed-sagemaker`` / ``python -m dogbreed.sagemaker`` (see :mod:`dogbreed.sagemaker.__main__`).
"""

from dogbreed.sagemaker.__main__ import main

if __name__ == "__main__":
    main()
