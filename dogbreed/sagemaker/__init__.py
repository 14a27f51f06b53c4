"""SageMaker launcher and container entry point; an optional extra (``pip install dogbreed[sagemaker]``: SDK v3).

- :mod:`dogbreed.sagemaker.hyperparameters`: hyperparameters <-> Hydra overrides, metric regexes (no SDK).
- :mod:`dogbreed.sagemaker.entry`: what runs inside the training container; calls ``dogbreed.train.train``.
- :mod:`dogbreed.sagemaker.launcher`: composes the configs and hands each verb its settings; one module per verb:
  :mod:`~dogbreed.sagemaker.training`, :mod:`~dogbreed.sagemaker.tuning`, :mod:`~dogbreed.sagemaker.deployment`,
  :mod:`~dogbreed.sagemaker.analytics`, with :mod:`~dogbreed.sagemaker.session` and
  :mod:`~dogbreed.sagemaker.inputs` (code, data and weights channels) shared by them.

Nothing in the core imports this package; the ``sagemaker`` SDK is imported lazily, inside the verbs.
"""
