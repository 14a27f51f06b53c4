"""Stage a dataset source (local folder, ``s3://bucket/prefix``, ``https://...zip``, ``fashion-mnist``) locally.

Remote sources land in ``<cache_dir>/<key>/`` with a ``manifest.json`` (relative path, size, sha256,
etag). Every file is written under a temporary name and renamed only once its size is verified, and the
manifest is written last, so an interrupted transfer is resumed rather than mistaken for a complete one.
A second run with the manifest in place transfers nothing. Concurrent stagers (DDP ranks, parallel
tuning trials) serialise on a file lock. A full disk stops staging with a one-line :class:`DataError` (the
folder, the bytes needed and free), leaving no file a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import urllib.request
import zipfile
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
    sha256_file,
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


def stage(source: str | Path, cache_dir: str | Path | None = None, *, endpoint_url: str | None = None) -> Path:
    """Return a local folder holding ``source``, transferring only what is not already staged.

    Args:
        source: A local folder (used in place), ``s3://bucket/prefix``, an ``http(s)://`` zip archive, or
            ``fashion-mnist[:/idx/folder]`` (see :mod:`dogbreed.data.fashion_mnist`).
        cache_dir: Where remote sources are staged (default :func:`default_cache_dir`).
        endpoint_url: S3 endpoint for S3-compatible servers; ``AWS_ENDPOINT_URL`` is honoured too.
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
                _stage_s3(source, target, endpoint_url)
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


def _stage_s3(source: str, target: Path, endpoint_url: str | None) -> None:
    bucket, prefix = split_s3_uri(source)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = s3_client(endpoint_url)
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
    pending = sum(obj["Size"] for rel, obj in listed.items() if not _staged(manifest.get(rel), obj, dests[rel]))
    if pending > shutil.disk_usage(target).free:  # before a byte is written, with the size it needs
        raise DiskFullError(files_dir, pending)
    entries: dict[str, dict[str, Any]] = {}
    transferred = 0
    for rel, obj in sorted(listed.items()):
        dest = dests[rel]
        etag = obj["ETag"].strip('"')
        known = manifest.get(rel)
        if _staged(known, obj, dest):
            entries[rel] = known
            continue
        with atomic_path(dest) as tmp:
            client.download_file(bucket, obj["Key"], str(tmp))
            if tmp.stat().st_size != obj["Size"]:
                raise DataError(
                    f"s3://{bucket}/{obj['Key']}: got {tmp.stat().st_size} bytes, expected {obj['Size']}; "
                    "re-run to retry."
                )
        entries[rel] = {"size": obj["Size"], "sha256": sha256_file(dest), "etag": etag}
        transferred += 1
    for stale in set(manifest) - set(listed):
        (files_dir / stale).unlink(missing_ok=True)
    _write_manifest(target, source, entries)
    log.info(
        "Staged %s -> %s (%d transferred, %d already present)",
        source,
        files_dir,
        transferred,
        len(entries) - transferred,
    )


def _staged(known: dict[str, Any] | None, obj: dict[str, Any], dest: Path) -> bool:
    """Whether the manifest's entry ``known`` still describes the listed object ``obj``, staged whole at ``dest``."""
    return (
        bool(known)
        and known["etag"] == obj["ETag"].strip('"')
        and dest.is_file()
        and dest.stat().st_size == known["size"]
    )


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
