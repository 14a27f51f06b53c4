"""Stage a dataset source (local folder, ``s3://bucket/prefix``, ``https://...zip``, ``fashion-mnist``) locally.

Remote sources land in ``<cache_dir>/<key>/`` with a ``manifest.json`` (relative path, size, sha256,
etag). Every file is written under a temporary name and renamed only once its size is verified, and the
manifest is written last, so an interrupted transfer is resumed rather than mistaken for a complete one.
A second run with the manifest in place transfers nothing. Concurrent stagers (DDP ranks, parallel
tuning trials) serialise on a file lock. A full disk stops staging with a one-line :class:`DataError` (the
folder, the bytes needed and free), leaving no file a later run would trust.

A flaky S3 (connection resets, HTTP 500/503, throttling, stalled reads) is ridden out as :class:`S3Retry`
says: botocore retries whole requests, and failures in the middle of a body, which botocore does not retry,
resume from the bytes already written with a ``Range`` request bound to the object's ETag by ``If-Match``,
so an object that changes in S3 meanwhile is staged again from its first byte, never mixed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import random
import re
import shutil
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from dogbreed._io import (
    DataError,
    DiskFullError,
    atomic_path,
    cache_key,
    default_cache_dir,
    file_lock,
    is_disk_full,
    read_json,
    s3_client,
    split_s3_uri,
    write_json,
)
from dogbreed.data import fashion_mnist
from dogbreed.data.layout import find_split_dirs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def is_remote(source: str) -> bool:
    """Sources that are staged into the cache rather than used in place (Fashion-MNIST is built from IDX files)."""
    return urlparse(str(source)).scheme in ("s3", "http", "https") or fashion_mnist.is_source(str(source))


def state_dir(source: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cache folder that holds a source's staged files, manifest, cached checks and data report."""
    source = str(source)
    key = cache_key(source) if is_remote(source) else f"local-{cache_key(str(Path(source).expanduser().resolve()))}"
    return Path(cache_dir or default_cache_dir()).expanduser() / key


@dataclass(frozen=True)
class S3Retry:
    """How long and how staging retries a flaky S3 (``data.s3_retry``).

    Attributes:
        give_up_s: Seconds an object may go without a byte of progress (failures and back-off included)
            before staging stops with a one-line error naming it; what was received is kept for the next run.
        read_timeout_s: Seconds a response may stall without a byte before it counts as a failure.
        max_attempts: botocore's attempts per request (its retries of resets, 5xx and throttling before a
            response body starts); staging's own loop retries on top of them.
        mode: botocore's retry mode: ``standard``, or ``adaptive`` (also slows the client down when throttled).
    """

    give_up_s: float = 600.0
    read_timeout_s: float = 60.0
    max_attempts: int = 5
    mode: str = "standard"

    def __post_init__(self) -> None:
        if self.mode not in ("standard", "adaptive"):
            raise ValueError(f"data.s3_retry.mode={self.mode!r}: use standard or adaptive.")
        for field in ("give_up_s", "read_timeout_s", "max_attempts"):
            if not getattr(self, field) > 0:
                raise ValueError(f"data.s3_retry.{field}={getattr(self, field)!r}: give a positive number.")

    def client_config(self) -> Any:
        """The botocore ``Config`` for these retries and timeouts."""
        from botocore.config import Config

        return Config(
            retries={"mode": self.mode, "total_max_attempts": int(self.max_attempts)},
            read_timeout=self.read_timeout_s,
            connect_timeout=min(self.read_timeout_s, 60.0),
        )


def stage(
    source: str | Path,
    cache_dir: str | Path | None = None,
    *,
    endpoint_url: str | None = None,
    s3_retry: S3Retry | None = None,
) -> Path:
    """Return a local folder holding ``source``, transferring only what is not already staged.

    Args:
        source: A local folder (used in place), ``s3://bucket/prefix``, an ``http(s)://`` zip archive, or
            ``fashion-mnist[:/idx/folder]`` (see :mod:`dogbreed.data.fashion_mnist`).
        cache_dir: Where remote sources are staged (default :func:`default_cache_dir`).
        endpoint_url: S3 endpoint for S3-compatible servers; ``AWS_ENDPOINT_URL`` is honoured too.
        s3_retry: Retries and time bounds for S3 (default :class:`S3Retry`).
    """
    source = str(source)
    scheme = urlparse(source).scheme
    if not is_remote(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise DataError(
                f"data.source={source!r} {what}: give a folder in the dogImages layout, s3://bucket/prefix "
                "or an https://...zip archive."
            )
        return path
    target = state_dir(source, cache_dir)
    target.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(target.with_suffix(".lock")):
            if fashion_mnist.is_source(source):
                return fashion_mnist.stage(source, target)
            if scheme == "s3":
                _stage_s3(source, target, endpoint_url, s3_retry or S3Retry())
            else:
                _stage_archive(source, target)
    except OSError as err:
        if not is_disk_full(err):
            raise
        full = err if isinstance(err, DiskFullError) else DiskFullError(target, None)
        raise DataError(
            f"staging {source}: {full}. Free space there or set paths.cache_dir to a larger disk, then run again "
            "(nothing half-staged is trusted)."
        ) from err
    return dataset_root(target / "files")


def dataset_root(folder: Path) -> Path:
    """The folder holding ``train/``: ``folder`` itself or its single top-level subfolder (zip archives)."""
    with contextlib.suppress(DataError):
        find_split_dirs(folder)
        return folder
    children = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    if len(children) == 1:
        return dataset_root(children[0])
    return folder  # let the layout check report what is missing


def _write_manifest(target: Path, source: str, files: dict[str, dict[str, Any]]) -> None:
    write_json(target / MANIFEST, {"source": source, "files": files}, indent=1)


def safe_relpath(name: str, *, what: str) -> PurePosixPath:
    """Reject absolute paths and ``..`` components (zip-slip, crafted S3 keys)."""
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or (rel.parts and rel.parts[0].endswith(":")):
        raise DataError(f"refusing unsafe path {name!r} in {what}: absolute paths and '..' are not allowed.")
    return rel


# --- S3 -------------------------------------------------------------------------------------------


def _stage_s3(source: str, target: Path, endpoint_url: str | None, retry: S3Retry) -> None:
    bucket, prefix = split_s3_uri(source)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = s3_client(endpoint_url, config=retry.client_config())
    manifest = (read_json(target / MANIFEST) or {}).get("files", {})
    listed = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                listed[obj["Key"][len(prefix) :]] = obj
    if not listed:
        raise DataError(
            f"no objects under {source}: upload the dataset with `python -m dogbreed.data upload DIR {source}`."
        )
    files_dir = target / "files"
    dests = {rel: files_dir / safe_relpath(rel, what=source) for rel in listed}
    todo = {rel for rel, obj in listed.items() if not _staged(manifest.get(rel), obj, dests[rel])}
    pending = sum(_still_to_fetch(listed[rel], dests[rel]) for rel in todo)
    if pending > shutil.disk_usage(target).free:  # before a byte is written, with the size it still needs
        raise DiskFullError(files_dir, pending)
    entries: dict[str, dict[str, Any]] = {}
    for rel, obj in sorted(listed.items()):
        if rel in todo:
            entries[rel] = _download(client, bucket, obj["Key"], obj["ETag"].strip('"'), obj["Size"], dests[rel], retry)
        else:
            entries[rel] = manifest[rel]
    for stale in set(manifest) - set(listed):
        (files_dir / stale).unlink(missing_ok=True)
    _write_manifest(target, source, entries)
    log.info(
        "Staged %s -> %s (%d transferred, %d already present)",
        source,
        files_dir,
        len(todo),
        len(entries) - len(todo),
    )


def _staged(known: dict[str, Any] | None, obj: dict[str, Any], dest: Path) -> bool:
    """Whether the manifest's entry ``known`` still describes the listed object ``obj``, staged whole at ``dest``."""
    return (
        bool(known)
        and known["etag"] == obj["ETag"].strip('"')
        and known["size"] == obj["Size"]
        and dest.is_file()
        and dest.stat().st_size == known["size"]
    )


def _still_to_fetch(obj: dict[str, Any], dest: Path) -> int:
    """Bytes of ``obj`` not yet on disk: a part an earlier run kept for the same ETag is resumed, not fetched again."""
    kept = _size(_part(dest, obj["ETag"].strip('"')))
    return obj["Size"] - min(kept, obj["Size"])


_BACKOFF_S = 0.5  # first pause after a failure; doubled per failure without progress, capped, half of it jittered
_BACKOFF_CAP_S = 20.0
_KMS = ("aws:kms", "aws:kms:dsse")  # their ETags are not the MD5 of the bytes
_BODY_CHUNK = 1 << 16  # a body cut short loses at most the chunk being read: the rest is written and resumed from
_MAX_CHANGES = 5  # an object rewritten this often while staging it is being written to: staging stops


class _Damaged(Exception):
    """A whole-length download whose bytes do not match the object's ETag: restarted from its first byte."""


def _download(client: Any, bucket: str, key: str, etag: str, size: int, dest: Path, retry: S3Retry) -> dict[str, Any]:
    """Download one object whole into ``dest`` and return its manifest entry, riding out a flaky S3.

    Bytes land in ``.<name>.<etag>.part`` beside ``dest``, renamed only when whole and checked, so a run that
    gives up (or is killed) leaves a file no run trusts but the next one resumes, and only for the same ETag.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    uri = f"s3://{bucket}/{key}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures, changes, started, last_progress = 0, 0, time.monotonic(), time.monotonic()
    while True:
        part = _part(dest, etag)
        _drop_other_parts(dest, keep=part)
        before = _size(part)
        try:
            sse = _fetch_rest(client, bucket, key, etag, size, part)
            sha256, md5 = _digests(part)
            if _size(part) != size or (md5 != etag and re.fullmatch(r"[0-9a-f]{32}", etag) and sse not in _KMS):
                got = _size(part)
                part.unlink()
                raise _Damaged(f"{got} bytes of {size} whose MD5 does not match the ETag")
            os.replace(part, dest)
            return {"size": size, "sha256": sha256, "etag": etag}
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = err.response.get("Error", {}).get("Code", "")
            if status == 412 or code == "PreconditionFailed":  # changed since listed, or since its first range
                part.unlink(missing_ok=True)
                head = client.head_object(Bucket=bucket, Key=key)
                changes += 1
                if changes >= _MAX_CHANGES:
                    raise DataError(
                        f"{uri}: changed {changes} times in S3 while staging it (now ETag {head['ETag']}); something "
                        "keeps writing it: stage the dataset once its upload has finished."
                    ) from err
                log.warning("%s changed in S3 while staging (ETag %s -> %s): staging it again", uri, etag, head["ETag"])
                etag, size = head["ETag"].strip('"'), head["ContentLength"]
                continue
            if status < 500 and status not in (408, 429) and code not in ("SlowDown", "Throttling", "RequestTimeout"):
                raise DataError(
                    f"{uri}: {code or status} ({err}); check the bucket, the key and its permissions."
                ) from err
            why = f"HTTP {status} {code}".strip()
        except (BotoCoreError, _Damaged) as err:
            why = str(err) or type(err).__name__
        except OSError as err:
            if is_disk_full(err) or not isinstance(err, ConnectionError):
                part.unlink(missing_ok=True)  # no half-written file holds the space a retry needs
                raise
            why = str(err) or type(err).__name__
        if _size(part) > before:  # the failure came after progress: the bound and the back-off start again
            failures, last_progress = 0, time.monotonic()
        failures += 1
        pause = min(_BACKOFF_CAP_S, _BACKOFF_S * 2 ** (failures - 1))
        pause = pause / 2 + random.uniform(0, pause / 2)
        if time.monotonic() + pause - last_progress > retry.give_up_s:
            raise DataError(
                f"{uri}: gave up after {time.monotonic() - started:.0f} s, {failures} failures in a row without a "
                f"byte of progress (last: {why}); {_size(part)} of {size} bytes are kept and resume on the next run. "
                "Check the network to S3 and run again, or raise data.s3_retry.give_up_s."
            )
        log.warning("%s: %s; retrying in %.1f s (%d of %d bytes staged)", uri, why, pause, _size(part), size)
        time.sleep(pause)


def _fetch_rest(client: Any, bucket: str, key: str, etag: str, size: int, part: Path) -> str | None:
    """Append the bytes of ``key`` that ``part`` lacks; return the object's server-side encryption.

    ``If-Match`` binds every range to the ETag the first byte came from: S3 answers 412 once the object changes.
    """
    have = _size(part)
    if have > size:
        part.unlink()
        have = 0
    request = {"Bucket": bucket, "Key": key, "IfMatch": f'"{etag}"'}
    if have == size and size:
        return client.head_object(**request).get("ServerSideEncryption")
    if have:
        request["Range"] = f"bytes={have}-"
    response = client.get_object(**request)
    with open(part, "ab") as out:
        for chunk in response["Body"].iter_chunks(_BODY_CHUNK):
            out.write(chunk)
    return response.get("ServerSideEncryption")


def _drop_other_parts(dest: Path, keep: Path) -> None:
    """Remove partial downloads of ``dest`` from other versions of the object (they must never be mixed in)."""
    for other in dest.parent.glob(f".{glob.escape(dest.name)}.*.part"):
        if other != keep:
            other.unlink(missing_ok=True)


def _part(dest: Path, etag: str) -> Path:
    """Where the bytes of ``dest``'s object at ``etag`` gather until it is whole."""
    return dest.with_name(f".{dest.name}.{etag}.part")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _digests(path: Path) -> tuple[str, str]:
    """Hex sha256 (for the manifest) and MD5 (a single-part upload's ETag) of a file, in one read."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def upload(local_dir: str | Path, uri: str, *, endpoint_url: str | None = None) -> int:
    """Upload every file under ``local_dir`` to ``uri`` keeping relative paths; return the file count."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise DataError(f"{local_dir} is not a folder.")
    bucket, prefix = split_s3_uri(uri)
    client = s3_client(endpoint_url)
    count = 0
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(local_dir).as_posix()]))
        client.upload_file(str(path), bucket, key)
        count += 1
    return count


# --- https zip archives -------------------------------------------------------------------------------


def _stage_archive(source: str, target: Path) -> None:
    manifest = read_json(target / MANIFEST)
    if manifest and manifest.get("source") == source and (target / "files").is_dir():
        return
    archive = target / "archive.zip"
    if not archive.is_file():
        log.info("Downloading %s", source)
        with atomic_path(archive) as tmp:
            try:
                with urllib.request.urlopen(source, timeout=60) as response, open(tmp, "wb") as out:
                    expected = int(response.headers.get("Content-Length") or -1)
                    shutil.copyfileobj(response, out, _CHUNK)
            except OSError as err:
                raise DataError(
                    f"could not download {source} ({err}). Without network access, download the archive elsewhere, "
                    "unzip it and set data.source to the folder (or upload it with `python -m dogbreed.data upload`)."
                ) from err
            if expected >= 0 and tmp.stat().st_size != expected:
                raise DataError(f"{source}: downloaded {tmp.stat().st_size} of {expected} bytes; re-run to retry.")
    extract = target / ".files.tmp"
    shutil.rmtree(extract, ignore_errors=True)
    entries = extract_zip(archive, extract)
    shutil.rmtree(target / "files", ignore_errors=True)
    os.replace(extract, target / "files")
    _write_manifest(target, source, entries)
    archive.unlink()


def extract_zip(archive: Path, dest: Path) -> dict[str, dict[str, Any]]:
    """Extract safely (no absolute paths, no ``..``, no links) and return manifest entries."""
    entries: dict[str, dict[str, Any]] = {}
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        archive.unlink()
        raise DataError(
            f"{archive} is not a valid zip archive ({err}); it was removed, re-run to download again."
        ) from err
    with zf:
        for info in zf.infolist():
            rel = safe_relpath(info.filename, what=str(archive))
            if info.is_dir() or rel.parts[0] == "__MACOSX":
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DataError(f"refusing symbolic link {info.filename!r} in {archive}.")
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with zf.open(info) as src, open(out, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            entries[rel.as_posix()] = {"size": info.file_size, "sha256": digest.hexdigest()}
    return entries
