"""Private file, process and S3 helpers shared by ``data/``, ``models/``, ``serve/``, ``sagemaker/`` and ``artifacts``.

One home for the small utilities every stage needs, so that each writes files the same way: under a temporary
name renamed into place once complete (a reader never sees half a file, an interrupted run never leaves one).
Not public API: import from here only inside ``dogbreed``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

_CHUNK = 1 << 20


class DataError(ValueError):
    """The dataset cannot be used as it is; the message names the file or folder and the fix."""


class DiskFullError(OSError):
    """A file the file system has no room for: names the path, the bytes it needed and the bytes free.

    An ``OSError`` with ``errno.ENOSPC``, so code that handles a full disk still recognises it; its text is
    one line, without the ``[Errno 28]`` prefix, for callers to add what the user does next.
    """

    def __init__(self, path: str | Path, needed: int | None) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.path, self.needed = Path(path), needed
        self.free = free_bytes(self.path)

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:
        return type(self), (str(self.path), self.needed)

    def __str__(self) -> str:
        need = f"it needs {format_bytes(self.needed)}" if self.needed else "it needs more"
        free = f"{format_bytes(self.free)} free there" if self.free is not None else "the file system is gone"
        return f"no space left on the device for {self.path}: {need}, {free}"


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says a file system is full (or over quota).

    Errors raised in a DataLoader worker reach the main process as their text only, so that is read too.
    """
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, OSError) and err.errno is None and f"[Errno {errno.ENOSPC}]" in str(err)


def free_bytes(path: Path) -> int | None:
    """Bytes free on the file system holding ``path`` (or its nearest existing parent); None if none exists."""
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def format_bytes(n: int) -> str:
    """``1.5 GB``, ``134.2 MB``, ``12 kB``: sizes in messages, in the units ``df -H`` uses."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{max(n, 0) / 1e3:.0f} kB"


# --- files ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` only if the block succeeds.

    The temporary name carries the process id, so concurrent writers (DDP ranks, parallel trials) never
    interleave their bytes; the last complete file wins. A block that fails takes its temporary file with it:
    no later process would read it (another pid), and on a full disk it holds the space a retry needs.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_bytes_durably(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that a crash, a kill or a full disk leaves either the old file or the new one.

    The bytes go to a temporary sibling (same file system, so the rename is atomic), which is fsynced before
    it replaces ``path``; the folder is fsynced after, so the rename outlives a power cut. A file larger than
    the free space is refused before a byte is written, with a :class:`DiskFullError`, as is one the disk
    fills up under.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if len(data) > free:
        raise DiskFullError(path, len(data))
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(path, len(data)) from err
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


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


_VECTOR_FLAGS = (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"),
                 ("AMX", "amx_tile"))  # fmt: skip


def cpu_description() -> str:
    """The CPU's model name, its vector extensions and cores: torch runs about 5x faster with AVX-512 than with
    AVX2 alone, so a time means little without them."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    extensions = [name for name, flag in _VECTOR_FLAGS if flag in flags]
    model = model or platform.processor() or "unknown CPU"
    return f"{model}; {', '.join(extensions) or 'no AVX2'}; {os.cpu_count()} CPUs"


def declared_requirements(extras: Iterable[str] | None = ()) -> list[tuple[str, str]]:
    """dogbreed's own requirements and those of ``extras`` (None: every extra) as ``(name, requirement)``, read from
    its installed metadata: pyproject.toml stays the one place for a pin that a job's or a model package's
    ``requirements.txt`` repeats. Raises :class:`importlib.metadata.PackageNotFoundError` where dogbreed is not
    installed."""
    wanted = None if extras is None else set(extras)
    declared = []
    for requirement in importlib.metadata.requires("dogbreed") or []:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if extra and wanted is not None and extra.group(1) not in wanted:
            continue
        requirement = re.sub(r"\s*;\s*extra\s*==.*$", "", requirement)
        declared.append((re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].lower(), requirement))
    return declared


# --- cache and S3 ---------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$DOGBREED_CACHE`` or ``~/.cache/dogbreed``."""
    return Path(os.environ.get("DOGBREED_CACHE", Path.home() / ".cache" / "dogbreed")).expanduser()


def cache_key(source: str) -> str:
    """A readable, collision-safe folder name for a remote source."""
    parsed = urlparse(source)
    stem = (parsed.netloc + parsed.path).strip("/").replace("/", "_")[-60:]
    return "-".join(filter(None, [parsed.scheme, stem, hashlib.sha256(source.encode()).hexdigest()[:10]]))


def s3_client(endpoint_url: str | None = None, *, config: Any = None) -> Any:
    """A boto3 S3 client; ``endpoint_url`` (or ``AWS_ENDPOINT_URL``) points it at S3-compatible servers.

    ``config`` is a ``botocore.config.Config`` (retries, timeouts), as staging passes for a flaky S3.
    """
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None, config=config)


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
