"""``python -m dogbreed.predict MODEL INPUT -o predictions.csv``: classify many images with the serving code path.

MODEL is a run dir, a model package dir or a ``model.tar.gz``; INPUT a folder (searched recursively), a list
file (one path or ``s3://`` URI per line), one image, or ``s3://bucket/prefix``. The model is loaded by
:mod:`dogbreed.serve.runtime` and every image decoded by :mod:`dogbreed.serve.codec` and preprocessed exactly as
the endpoint does, so a batch answer equals the endpoint's answer for the same file. Images are decoded in
threads and classified in batches on the device; a file that cannot be read or decoded becomes a row with its
reason in ``error`` and the run goes on. A folder in the dogImages layout (``INPUT/<NNN.Class>/img`` or
``INPUT/<split>/<NNN.Class>/img``) is labelled: the accuracy is printed and a confusion matrix written next to
the output.

Like the serving modules, this module never imports Lightning or the training code, and boto3 only for ``s3://``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import torch

from dogbreed._io import atomic_path, available_cpus, s3_client, split_s3_uri
from dogbreed.artifacts import write_confusion_csv
from dogbreed.data.layout import IMAGE_EXTENSIONS, NUMBERED_CLASS_FOLDER, display_name
from dogbreed.serve.codec import ACCEPTED_INPUT, InferenceError, Limits, Prediction, decode_image, format_predictions
from dogbreed.serve.package import extract_package, find_model_dir
from dogbreed.serve.runtime import RUNTIME_CHOICES, DogBreedModel, load_model

__all__ = ["FORMATS", "PredictError", "Result", "Summary", "list_inputs", "open_model", "predict", "predict_to_file"]

log = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl")
_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


class PredictError(ValueError):
    """MODEL or INPUT cannot be used; the message names the path and the fix."""


@dataclass(frozen=True)
class Item:
    """One image to classify: where it is (a local path or an ``s3://`` URI) and its true class, if labelled."""

    path: str
    truth: str | None = None


@dataclass
class Result:
    """The answer for one image: its top-k ``{"label", "index", "probability"}``, or why there is none."""

    path: str
    truth: str | None
    predictions: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Summary:
    """What :func:`predict_to_file` wrote and, for a labelled input, how often the top class was right."""

    output: Path
    images: int
    errors: int
    seconds: float
    correct: int = 0
    labelled: int = 0
    confusion_csv: Path | None = None
    unknown_classes: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


def class_of_folder(folder: str) -> str | None:
    """``001.Affenpinscher`` -> ``Affenpinscher`` (the training's display name); None for any other folder."""
    return display_name(folder) if NUMBERED_CLASS_FOLDER.match(folder) else None


def open_model(source: str | Path, *, runtime: str | None = None, device: str | None = None) -> DogBreedModel:
    """Load a ``model.tar.gz``, a package dir or a run dir with :func:`~dogbreed.serve.runtime.load_model`."""
    path = Path(source)
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError(f"--device {device}, but torch sees no CUDA device here: use --device cpu.")
    if not path.exists():
        raise PredictError(f"{source} does not exist: pass a model.tar.gz, an unpacked model package or a run dir.")
    try:
        with tempfile.TemporaryDirectory(prefix="dogbreed-predict-") as tmp:
            model_dir = find_model_dir(extract_package(path, tmp) if path.is_file() else path)
            return load_model(model_dir, runtime=runtime, device=device)
    except tarfile.TarError:
        raise PredictError(
            f"{source} is not a .tar.gz archive: pass a model.tar.gz from `python -m dogbreed.package`, an unpacked "
            "model package or a run dir."
        ) from None
    except (OSError, ValueError, ImportError, RuntimeError) as err:
        raise PredictError(f"cannot load the model {source}: {err}") from None


def _labelled(items: list[Item], relative: Callable[[str], PurePosixPath]) -> list[Item]:
    """Give every item its class when all lie in class folders one or two levels below the root, else none."""
    truths = []
    for item in items:
        parts = relative(item.path).parts
        truth = class_of_folder(parts[-2]) if len(parts) in (2, 3) else None
        if truth is None:
            return items
        truths.append(truth)
    return [Item(item.path, truth) for item, truth in zip(items, truths, strict=True)]


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _list_s3(uri: str) -> list[Item]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(uri)
    prefix = f"{prefix.rstrip('/')}/" if prefix.strip("/") else ""
    keys = []
    try:
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", []) if _is_image(o["Key"])]
    except (BotoCoreError, ClientError) as err:
        raise PredictError(
            f"cannot list {uri}: {err}. Check the bucket and your AWS credentials (AWS_ENDPOINT_URL for an "
            "S3-compatible server)."
        ) from None
    items = [Item(f"s3://{bucket}/{key}") for key in sorted(keys)]
    root = len(f"s3://{bucket}/{prefix}")
    return _labelled(items, lambda path: PurePosixPath(path[root:]))


def _list_folder(root: Path) -> list[Item]:
    files = (p for p in root.rglob("*") if p.is_file() and _is_image(p.name))
    paths = sorted(p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts))
    return _labelled([Item(str(p)) for p in paths], lambda path: PurePosixPath(Path(path).relative_to(root)))


def list_inputs(source: str | Path) -> list[Item]:
    """The images of ``source``: a folder (recursively), ``s3://bucket/prefix``, one image, or a list file.

    Lines of a list file are paths (relative to the current directory) or ``s3://`` URIs; blank lines and
    lines starting with ``#`` are skipped. Listed files are read whatever their name: a missing one is a row
    with an error, like any other unreadable file.
    """
    text = str(source)
    path = Path(source)
    if text.startswith("s3://"):
        items = _list_s3(text)
    elif path.is_dir():
        items = _list_folder(path)
    elif path.is_file() and _is_image(path.name):
        items = [Item(text)]
    elif path.is_file():
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise PredictError(
                f"{source} is neither an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) nor a text list of "
                f"paths ({type(err).__name__}): pass a folder, an image, a list file or s3://bucket/prefix."
            ) from None
        items = [Item(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        raise PredictError(
            f"{source} does not exist: pass a folder of images, an image, a list file (one path per line) or "
            "s3://bucket/prefix."
        )
    if not items:
        raise PredictError(
            f"{source} holds no images (files ending {', '.join(sorted(IMAGE_EXTENSIONS))}): check the path."
        )
    return items


class _Reader:
    """Reads local files and ``s3://`` objects; one S3 client, created on first use, shared by the threads."""

    def __init__(self) -> None:
        self._s3: Any = None

    def __call__(self, path: str) -> bytes:
        if not path.startswith("s3://"):
            return Path(path).read_bytes()
        if self._s3 is None:
            self._s3 = s3_client()
        bucket, key = split_s3_uri(path)
        return self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _reason(err: InferenceError) -> str:
    """The handler's message without its list of HTTP content types, which means nothing for a file."""
    return f"{err.body['error']}: {err.body['message'].replace(f'; {ACCEPTED_INPUT}', '')}"


def _prepare(model: DogBreedModel, read: Callable[[str], bytes], limits: Limits, item: Item) -> torch.Tensor | str:
    """The preprocessed ``(3, S, S)`` tensor of one image, or the reason it has none."""
    try:
        data = read(item.path)
    except Exception as err:  # OSError, botocore's ClientError ...: one unreadable file must not stop the run
        return f"unreadable: {type(err).__name__}: {err}"
    try:
        return model.preprocess([decode_image(data, limits, what=item.path)])[0]
    except InferenceError as err:
        return _reason(err)
    except Exception as err:  # anything else a strange file triggers while decoding or transforming
        return f"failed: {type(err).__name__}: {err}"


def _prefetch(pool: ThreadPoolExecutor, work: Callable[[Item], Any], items: Iterable[Item], ahead: int) -> Iterator:
    """``(item, work(item))`` in order, with at most ``ahead`` items in flight (memory stays bounded)."""
    queue: deque = deque()
    for item in items:
        queue.append((item, pool.submit(work, item)))
        if len(queue) > ahead:
            done, future = queue.popleft()
            yield done, future.result()
    while queue:
        done, future = queue.popleft()
        yield done, future.result()


def predict(
    model: DogBreedModel,
    items: Iterable[Item],
    *,
    top_k: int | None = None,
    batch_size: int = 32,
    workers: int = 4,
    limits: Limits | None = None,
) -> Iterator[Result]:
    """Classify ``items`` in batches, yielding one :class:`Result` per item in order.

    Decoding and preprocessing run in ``workers`` threads while the model runs; the limits default to the
    endpoint's (``DOGBREED_MAX_*``), so a file the endpoint refuses is refused here too.
    """
    limits = limits or Limits.from_env()
    read = _Reader()
    pending: list[tuple[Item, torch.Tensor | str]] = []  # in input order; a str is why an item has no tensor

    def flush() -> Iterator[Result]:
        tensors = [prepared for _, prepared in pending if isinstance(prepared, torch.Tensor)]
        answers: list[list[dict[str, Any]] | str] = []
        if tensors:
            probabilities = model.predict(torch.stack(tensors))
            answer = Prediction(probabilities, model.class_names, batched=True, top_k=top_k, default_top_k=model.top_k)
            try:
                answers = format_predictions(answer)["predictions"]
            except InferenceError as err:  # non-finite output: every image of the batch gets the reason
                answers = [_reason(err)] * len(tensors)
        ordered = iter(answers)
        for item, prepared in pending:
            row = next(ordered) if isinstance(prepared, torch.Tensor) else prepared
            yield (
                Result(item.path, item.truth, error=row) if isinstance(row, str) else Result(item.path, item.truth, row)
            )
        pending.clear()

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="dogbreed-predict") as pool:
        work = functools.partial(_prepare, model, read, limits)
        for item, prepared in _prefetch(pool, work, items, ahead=2 * batch_size):
            pending.append((item, prepared))
            if sum(isinstance(p, torch.Tensor) for _, p in pending) >= batch_size:
                yield from flush()
        yield from flush()


class _Progress:
    """``done/total images, rate`` on one stderr line, redrawn at most 5 times a second; silent unless a TTY."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.enabled = stream.isatty()
        self.start = self.drawn = time.monotonic()

    def update(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.enabled and (now - self.drawn > 0.2 or self.done == self.total):
            self.drawn = now
            filled = 30 * self.done // self.total
            rate = self.done / max(now - self.start, 1e-9)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} images, {rate:.1f}/s")
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


def output_format(output: Path, fmt: str | None) -> str:
    """``fmt``, or the format the output's suffix names (``.csv``; ``.jsonl``, ``.ndjson``, ``.json``)."""
    if fmt:
        if fmt not in FORMATS:
            raise PredictError(f"format {fmt!r} is not one of {FORMATS}.")
        return fmt
    if output.suffix.lower() not in _SUFFIX_FORMATS:
        raise PredictError(
            f"cannot tell the format of {output} from its suffix: name it .csv or .jsonl, or pass --format csv|jsonl."
        )
    return _SUFFIX_FORMATS[output.suffix.lower()]


def confusion_path(output: Path) -> Path:
    """``predictions.csv`` -> ``predictions_confusion_matrix.csv`` (next to the output)."""
    return output.with_name(f"{output.stem}_confusion_matrix.csv")


def _csv_row(result: Result, k: int, labelled: bool) -> list[Any]:
    cells: list[Any] = [result.path, *([result.truth] if labelled else [])]
    for i in range(k):
        p = result.predictions[i] if i < len(result.predictions) else None
        cells += [p["label"], p["probability"]] if p else ["", ""]
    return [*cells, result.error or ""]


def predict_to_file(
    model_source: str | Path,
    input_source: str | Path,
    output: str | Path,
    *,
    fmt: str | None = None,
    top_k: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
    runtime: str | None = None,
    workers: int | None = None,
) -> Summary:
    """Classify every image of ``input_source`` and write one row each to ``output`` (CSV or JSON lines).

    CSV columns: ``path``, ``true_label`` (labelled inputs only), ``label_1``, ``probability_1`` ... ``label_k``,
    ``probability_k``, ``error``; JSON lines hold the same as ``{"path", "true_label", "predictions", "error"}``.
    For a labelled input, the confusion matrix over the model's classes goes to :func:`confusion_path`.
    """
    start = time.monotonic()
    output = Path(output)
    fmt = output_format(output, fmt)
    if batch_size < 1 or (top_k is not None and top_k < 1):
        raise PredictError(f"batch size ({batch_size}) and top-k ({top_k}) must be at least 1.")
    model = open_model(model_source, runtime=runtime, device=device)
    items = list_inputs(input_source)
    k = min(top_k or model.top_k, len(model.class_names))
    labelled = items[0].truth is not None
    index = {name: i for i, name in enumerate(model.class_names)}
    confusion = torch.zeros(len(index), len(index), dtype=torch.int64)
    summary = Summary(output, images=len(items), errors=0, seconds=0.0)
    unknown: set[str] = set()
    progress = _Progress(len(items))
    with atomic_path(output) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        if fmt == "csv":
            ranks = [c for i in range(1, k + 1) for c in (f"label_{i}", f"probability_{i}")]
            writer.writerow(["path", *(["true_label"] if labelled else []), *ranks, "error"])
        for result in predict(
            model, items, top_k=k, batch_size=batch_size, workers=workers or min(4, available_cpus())
        ):
            progress.update()
            summary.errors += result.error is not None
            if labelled and result.predictions:
                if result.truth in index:
                    predicted = result.predictions[0]["index"]
                    confusion[index[result.truth], predicted] += 1
                    summary.correct += predicted == index[result.truth]
                    summary.labelled += 1
                else:
                    unknown.add(str(result.truth))
            if fmt == "csv":
                writer.writerow(_csv_row(result, k, labelled))
            else:
                record = {"path": result.path, **({"true_label": result.truth} if labelled else {})}
                f.write(json.dumps({**record, "predictions": result.predictions, "error": result.error}) + "\n")
    if labelled:
        summary.confusion_csv = confusion_path(output)
        write_confusion_csv(summary.confusion_csv, confusion, model.class_names)
        summary.unknown_classes = sorted(unknown)
    summary.seconds = time.monotonic() - start
    return summary


def main(argv: list[str] | None = None) -> None:
    """CLI of ``python -m dogbreed.predict`` / ``dogbreed-predict``."""
    parser = argparse.ArgumentParser(
        prog="python -m dogbreed.predict",
        description="Classify a folder, list file, image or s3:// prefix of images with a dogbreed model, "
        "exactly as the endpoint would; write one CSV or JSON-lines row per image.",
    )
    parser.add_argument("model", help="model.tar.gz (python -m dogbreed.package), an unpacked package, or a run dir")
    parser.add_argument(
        "input", help="folder (recursive), list file (one path or s3:// URI per line), image, or s3://bucket/prefix"
    )
    parser.add_argument("-o", "--output", default="predictions.csv", help="file to write (default: predictions.csv)")
    parser.add_argument("--format", choices=FORMATS, help="csv or jsonl (default: from the output's suffix)")
    parser.add_argument("--top-k", type=int, help="classes per image (default: the package's, 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: DOGBREED_DEVICE, else CUDA if available)")
    parser.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        help="override the runtime the package recorded (auto: the fastest it carries)",
    )
    parser.add_argument("--workers", type=int, help="threads decoding images (default: up to 4 CPUs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = predict_to_file(
            args.model, args.input, args.output, fmt=args.format, top_k=args.top_k, batch_size=args.batch_size,
            device=args.device, runtime=args.runtime, workers=args.workers,
        )  # fmt: skip
    except PredictError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"Wrote {summary.output}: {summary.images} images, {summary.errors} errors, {summary.seconds:.1f} s")
    if summary.confusion_csv is not None:
        accuracy = f"{summary.accuracy:.3f}" if summary.accuracy is not None else "n/a"
        print(f"accuracy {accuracy} ({summary.correct} of {summary.labelled} labelled images right)")
        if summary.unknown_classes:
            print(f"not classes of this model, left out: {', '.join(summary.unknown_classes)}")
        print(f"confusion matrix: {summary.confusion_csv}")


if __name__ == "__main__":
    main()
