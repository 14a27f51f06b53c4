"""Private file, process and S3 helpers shared by ``data/``, ``models/``, ``serve/``, ``sagemaker/`` and ``artifacts``.

One home for the small utilities every stage needs, so that each writes files the same way: under a temporary
name renamed into place once complete (a reader never sees half a file, an interrupted run never leaves one).
Not public API: import from here only inside ``dogbreed``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

_CHUNK = 1 << 20


class DataError(ValueError):
    """The dataset cannot be used as it is; the message names the file or folder and the fix."""


# --- files ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` only if the block succeeds.

    The temporary name carries the process id, so concurrent writers (DDP ranks, parallel trials) never
    interleave their bytes; the last complete file wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    yield tmp
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any, *, indent: int = 2) -> None:
    """Write JSON atomically."""
    write_text(path, json.dumps(data, indent=indent))


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (a cache that must be rebuilt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a last line cut short by a killed writer is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (datasets and model weights do not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (processes and machines sharing the file system wait)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, container CPU sets), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# --- cache and S3 ---------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$DOGBREED_CACHE`` or ``~/.cache/dogbreed``."""
    return Path(os.environ.get("DOGBREED_CACHE", Path.home() / ".cache" / "dogbreed")).expanduser()


def cache_key(source: str) -> str:
    """A readable, collision-safe folder name for a remote source."""
    parsed = urlparse(source)
    stem = (parsed.netloc + parsed.path).strip("/").replace("/", "_")[-60:]
    return "-".join(filter(None, [parsed.scheme, stem, hashlib.sha256(source.encode()).hexdigest()[:10]]))


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client; ``endpoint_url`` (or ``AWS_ENDPOINT_URL``) points it at S3-compatible servers."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise DataError(f"{uri!r} is not an s3://bucket/prefix URI.")
    return parsed.netloc, parsed.path.lstrip("/")


def download_s3_file(uri: str, cache_dir: str | Path | None = None, *, endpoint_url: str | None = None) -> Path:
    """Fetch one S3 object into the cache (once) and return its local path (used for weight files)."""
    bucket, key = split_s3_uri(uri)
    dest = Path(cache_dir or default_cache_dir()).expanduser() / "files" / cache_key(uri) / PurePosixPath(key).name
    if dest.is_file():
        return dest
    with atomic_path(dest) as tmp:
        s3_client(endpoint_url).download_file(bucket, key, str(tmp))
    return dest
