"""URIs to filesystems: local paths, file://, s3:// (any S3-compatible store).

Credentials are never passed in: s3fs/botocore read them from the environment,
the shared config files or the instance role.
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from jobs.spec import StorageSpec


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it, plus how to print it back as a URI."""

    fs: fsspec.AbstractFileSystem
    path: str
    scheme: str  # "" for local, "s3", ...

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, *parts), self.scheme)

    @property
    def arrow_fs(self) -> pafs.FileSystem:
        """The same filesystem for pyarrow readers and writers."""
        if isinstance(self.fs, LocalFileSystem):
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))


def scheme_of(uri: str) -> str:
    scheme = urlsplit(uri).scheme
    # "C:\\photos" has a one-letter scheme on Windows; treat it as a local path.
    return "" if len(scheme) <= 1 or scheme == "file" else scheme


def fsspec_options(storage: StorageSpec | None, uri: str | None = None) -> dict:
    """Keyword arguments for the fsspec filesystem of ``uri`` (S3 if no uri is given).

    Only object storage takes options; credentials stay in the environment.
    """
    if uri is not None and scheme_of(uri) not in ("s3", "s3a"):
        return {}
    storage = storage or StorageSpec()
    client_kwargs = {}
    if storage.endpoint_url:
        client_kwargs["endpoint_url"] = storage.endpoint_url
    if storage.region:
        client_kwargs["region_name"] = storage.region
    return {"anon": storage.anon, "client_kwargs": client_kwargs}


def filesystem(scheme: str, storage: StorageSpec | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for a scheme; fsspec caches instances per arguments."""
    if scheme in ("", "file"):
        return fsspec.filesystem("file")
    if scheme in ("s3", "s3a"):
        return fsspec.filesystem("s3", **fsspec_options(storage, None))
    return fsspec.filesystem(scheme)


def locate(uri: str, storage: StorageSpec | None = None) -> Location:
    """Resolve a URI (or local path) to a :class:`Location`."""
    scheme = scheme_of(uri)
    fs = filesystem(scheme, storage)
    if scheme == "":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        path = posixpath.abspath(path)
    else:
        path = fs._strip_protocol(uri)
    return Location(fs, path, scheme)


def resolve_relative(uri: str, base: Location) -> str:
    """A manifest entry as a full URI: relative paths are relative to ``base``."""
    if scheme_of(uri) or uri.startswith("/") or uri.startswith("file://"):
        return uri
    return Location(base.fs, posixpath.normpath(posixpath.join(base.path, uri)), base.scheme).uri


def write_atomic(location: Location, data: bytes) -> None:
    """Write bytes so that readers see the whole object or nothing.

    The bytes go to a temporary name under the same folder's ``_tmp/`` (ignored
    by Parquet readers: names starting with ``_``), then move into place. A
    local rename is atomic; on S3 the final object appears whole on copy.
    """
    folder, name = posixpath.split(location.path)
    temporary = posixpath.join(folder, "_tmp", f"{name}.{uuid.uuid4().hex}")
    location.fs.makedirs(posixpath.dirname(temporary), exist_ok=True)
    with location.fs.open(temporary, "wb") as handle:
        handle.write(data)
    location.fs.mv(temporary, location.path)
