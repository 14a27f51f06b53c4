"""Serving: the model package (``model.tar.gz``), the SageMaker inference handlers and a local HTTP endpoint.

Only the light modules are imported here on purpose: ``handlers`` (with ``runtime`` and ``codec``, which it
imports) runs inside a stock SageMaker PyTorch container, and ``server`` (Starlette + uvicorn) is imported only
by ``python -m dogbreed.serve``.
"""
