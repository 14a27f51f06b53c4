"""SageMaker PyTorch inference handlers: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``, ``transform_fn``.

Only these five live here: the toolkit looks them up by name and calls them with its own arguments, so this
module is that contract and nothing else. The model package ships it with its import closure
(``code/inference.py`` re-exports ``model_fn`` and ``transform_fn``, which runs the other three), and the
local server and batch prediction call the same building blocks (:mod:`dogbreed.serve.runtime`,
:mod:`dogbreed.serve.codec`, where the request and answer formats are), so an endpoint answers identically on
SageMaker and on a laptop. None of them imports more than torch, torchvision, Pillow, numpy and the light
``dogbreed`` modules (never Lightning), so the stock SageMaker PyTorch container runs them without extra
installs.

The toolkit (``sagemaker_inference.transformer.Transformer``) counts each handler's parameters and passes
the request context as one more positional argument when a handler takes one more than the toolkit's own.
So each handler takes exactly the toolkit's arguments and nothing optional: ``input_fn`` reads its limits
from the environment (:meth:`~dogbreed.serve.codec.Limits.from_env`), and the local server calls
:func:`~dogbreed.serve.codec.decode_request` with its own limits. A refused request raises
:class:`~dogbreed.serve.codec.InferenceError`; :func:`transform_fn` answers it with its status and the JSON
alone (the toolkit's own error path would append the Python traceback to the body), and a package whose
``inference.py`` exports the four handlers instead still answers its status.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from dogbreed.serve.codec import (
    JSON_CONTENT_TYPE,
    InferenceError,
    Inputs,
    Limits,
    Prediction,
    accept_top_k,
    decode_request,
    format_predictions,
)
from dogbreed.serve.runtime import DogBreedModel, load_model

__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn", "transform_fn"]

log = logging.getLogger(__name__)


def model_fn(model_dir: str) -> DogBreedModel:
    """SageMaker: load the unpacked package from ``model_dir`` (``DOGBREED_RUNTIME`` overrides the runtime)."""
    return load_model(model_dir)


def input_fn(request_body: bytes | bytearray | str | None, request_content_type: str | None) -> Inputs:
    """SageMaker: decode a request within the limits of the environment (``DOGBREED_MAX_*``).

    Exactly the toolkit's two arguments: a third parameter would receive the toolkit's request context.
    """
    return decode_request(request_body, request_content_type, Limits.from_env())


def predict_fn(input_data: Inputs, model: DogBreedModel) -> Prediction:
    """Preprocess the decoded images and run one forward pass over all of them; explain the top-1 if asked."""
    if input_data.explain:
        model.require_explainable()
    pixels = model.preprocess(input_data.items)
    probabilities = model.predict(pixels)
    explanations = model.explain(pixels, probabilities) if input_data.explain else None
    return Prediction(
        probabilities, model.class_names, batched=input_data.batched, top_k=input_data.top_k,
        default_top_k=model.top_k, explanations=explanations,
    )  # fmt: skip


def output_fn(prediction: Prediction, accept: str | None) -> tuple[bytes, str]:
    """Serialise the top-k classes as JSON; the body's ``top_k`` wins over the Accept header's."""
    top_k = accept_top_k(accept)
    return json.dumps(format_predictions(prediction, top_k), allow_nan=False).encode(), JSON_CONTENT_TYPE


def transform_fn(
    model: DogBreedModel, request_body: bytes | bytearray | str | None, request_content_type: str | None,
    accept: str | None, context: Any,
) -> tuple[bytes, str]:  # fmt: skip
    """SageMaker: ``input_fn``, ``predict_fn`` and ``output_fn`` for one request, answering failures in JSON.

    The toolkit answers an exception from a handler with its message followed by the Python traceback, which
    shows clients the endpoint's code and paths. Here a refusal answers its own status and JSON body, and
    anything else a 500 ``internal_error`` whose traceback goes to the endpoint's log (CloudWatch), as the
    local server does. ``context`` is TorchServe's request context, which the toolkit passes as the argument
    after its own four.
    """
    try:
        return output_fn(predict_fn(input_fn(request_body, request_content_type), model), accept)
    except InferenceError as err:
        status, body = err.status, err.body
    except Exception:
        log.exception("Unexpected error while answering a %s request", request_content_type)
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        body = {"error": "internal_error", "message": "the endpoint failed on this request; see its log."}
    context.set_response_status(code=int(status), phrase=HTTPStatus(status).phrase)
    return json.dumps(body).encode(), JSON_CONTENT_TYPE
