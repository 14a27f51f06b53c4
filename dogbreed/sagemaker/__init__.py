"""SageMaker launcher and container entry point; an optional extra (``pip install dogbreed[sagemaker]``).

- :mod:`dogbreed.sagemaker.hyperparameters`: hyperparameters <-> Hydra overrides, metric regexes (no SDK).
- :mod:`dogbreed.sagemaker.entry`: what runs inside the training container; calls ``dogbreed.train.train``.
- :mod:`dogbreed.sagemaker.launcher`: estimator, tuner, model and analytics from the Hydra configs (SDK v2).

Nothing in the core imports this package; the ``sagemaker`` SDK is imported only by ``launcher``.
"""
