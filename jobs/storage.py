"""URIs to filesystems: local paths, file://, s3:// (any S3-compatible store).

Credentials are never passed in: s3fs/botocore read them from the environment,
the shared config files or the instance role.

Failures are sorted into three kinds (see :func:`as_storage_error`):

* transient (connection refused/reset, timeouts, HTTP 5xx, throttling): retried
  by :func:`with_retry` with exponential backoff and jitter under a
  :class:`RetryPolicy`; when the policy runs out, :class:`StorageUnavailable`;
* per object (:class:`ObjectNotFound`, :class:`NotAnObject`): raised at once;
* systemic (:class:`AccessDenied`, :class:`NoSuchBucket`, :class:`WrongRegion`):
  raised at once, since no retry and no other row will fare better.

Our policy is the only retry layer for :func:`read_object` and
:func:`list_folder`: they run on a twin of the S3 filesystem whose botocore and
s3fs retries are off (:func:`single_attempt`), because the built-in layers
multiply (s3fs retries 5 times around botocore's 5 attempts, several seconds per
call when the endpoint is down) and would blow through any deadline of ours.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import posixpath
import random
import time
import uuid
from dataclasses import dataclass
from http.client import IncompleteRead
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from jobs.spec import StorageSpec

log = logging.getLogger(__name__)

T = TypeVar("T")


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


def write_atomic(location: Location, data: bytes) -> None:
    """Write bytes so that readers see the whole object or nothing.

    The bytes go to a temporary name beside the target (``_<name>.<uuid>``,
    ignored by Parquet readers: names starting with ``_``), then move into place,
    leaving nothing behind. A local rename is atomic; on S3 the final object
    appears whole on copy. Job outputs write through ``OutputFolder``, which keeps
    a run's temporaries under ``_tmp/<run id>/``.
    """
    folder, name = posixpath.split(location.path)
    temporary = posixpath.join(folder, f"_{name}.{uuid.uuid4().hex}")
    location.fs.makedirs(folder, exist_ok=True)
    with location.fs.open(temporary, "wb") as handle:
        handle.write(data)
    location.fs.mv(temporary, location.path)


# --- errors -------------------------------------------------------------------


class StorageError(Exception):
    """A storage call failed. Subclasses say how; catch this for all of them.

    Attributes:
        reason: short machine-readable cause: "not_found", "is_directory",
            "access_denied", "invalid_credentials", "signature_mismatch",
            "no_credentials", "no_such_bucket", "wrong_region", "unavailable",
            "tls_error", or "error" (anything else the store said no to).
        status: the row status a stage should record for this failure:
            "fetch_error" for a problem with one object, "storage_error" for a
            systemic one (counts towards stopping the job).
        systemic: True when every other object on this store will most likely
            fail the same way (credentials, bucket, region, store down).
        code: the S3 error code (e.g. "NoSuchKey") or the exception type behind it.
        http_status: the HTTP status of the failed response, if there was one.
    """

    reason = "error"
    systemic = False
    transient = False

    def __init__(self, message: str, *, reason: str | None = None, code: str | None = None,
                 http_status: int | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.code = code
        self.http_status = http_status

    @property
    def status(self) -> str:
        return "storage_error" if self.systemic else "fetch_error"

    def __reduce__(self):  # keep reason, code, ... when Ray pickles the error
        return type(self), (self.args[0],), self.__dict__


class ObjectNotFound(StorageError):
    """No object at that path (the bucket exists)."""

    reason = "not_found"


class NotAnObject(StorageError):
    """The path names a folder or a bucket, not an object."""

    reason = "is_directory"


class AccessDenied(StorageError):
    """Refused: permissions, unknown access key, bad secret, expired token, no credentials."""

    reason = "access_denied"
    systemic = True


class NoSuchBucket(StorageError):
    """The bucket does not exist (or the endpoint is not the one that holds it)."""

    reason = "no_such_bucket"
    systemic = True


class WrongRegion(StorageError):
    """The bucket lives in another region than the client signs for."""

    reason = "wrong_region"
    systemic = True


class StorageUnavailable(StorageError):
    """Transient failures went on past the retry policy: the store is down or overloaded.

    Attributes:
        attempts: how many attempts were made.
        elapsed_s: seconds from the first attempt to giving up.
    """

    reason = "unavailable"
    systemic = True

    def __init__(self, message: str, *, attempts: int = 0, elapsed_s: float = 0.0, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.attempts = attempts
        self.elapsed_s = elapsed_s


class _Transient(StorageError):
    """One failed attempt that is worth another try (internal to :func:`with_retry`)."""

    reason = "unavailable"
    transient = True


# S3 error codes by kind. Codes not listed fall back on the HTTP status.
_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "SlowDownRead", "SlowDownWrite",
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete", "OperationAborted", "ConditionalRequestConflict",
    "XAmzContentSHA256Mismatch", "500", "502", "503", "504",
}
_DENIED_CODES = {
    "AccessDenied": "access_denied",
    "AllAccessDisabled": "access_denied",
    "AccountProblem": "access_denied",
    "NotSignedUp": "access_denied",
    "InvalidSecurity": "access_denied",
    "InvalidAccessKeyId": "invalid_credentials",
    "InvalidClientTokenId": "invalid_credentials",
    "ExpiredToken": "invalid_credentials",
    "InvalidToken": "invalid_credentials",
    "TokenRefreshRequired": "invalid_credentials",
    "SignatureDoesNotMatch": "signature_mismatch",
    "RequestTimeTooSkewed": "signature_mismatch",
    "403": "access_denied",
}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchVersion", "404"}
_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EPIPE,
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it was raised from or during, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__


def _client_error(exc: BaseException) -> tuple[str | None, int | None, str]:
    """(S3 error code, HTTP status, server message) from a botocore ClientError in the chain."""
    from botocore.exceptions import ClientError

    for e in _chain(exc):
        if isinstance(e, ClientError):
            error = e.response.get("Error", {})
            http = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return error.get("Code"), http, error.get("Message", "")
    return None, None, ""


def _storage_exception_types() -> tuple[type[BaseException], ...]:
    """What storage calls raise when the store fails (anything else is a bug, not a failure)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError
    from fsspec.exceptions import FSTimeoutError

    types: tuple[type[BaseException], ...] = (OSError, BotoCoreError, ClientError, ResponseParserError,
                                              FSTimeoutError, IncompleteRead, asyncio.TimeoutError)
    try:
        import aiohttp

        types += (aiohttp.ClientError,)
    except ImportError:  # pragma: no cover - aiohttp comes with s3fs
        pass
    return types


def _is_transient_exception(exc: BaseException) -> bool:
    """Network-level failures: nothing came back from the store, or it broke off."""
    import botocore.exceptions as bce
    from botocore.parsers import ResponseParserError
    from fsspec.exceptions import FSTimeoutError

    transient: tuple[type[BaseException], ...] = (
        bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ProxyConnectionError,
        bce.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
        bce.IncompleteReadError,
        ResponseParserError,  # throttling replies with broken XML (s3fs retries these too)
        ConnectionError, TimeoutError, asyncio.TimeoutError, FSTimeoutError, IncompleteRead,
    )
    try:
        import aiohttp

        transient += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
    except ImportError:  # pragma: no cover - aiohttp comes with s3fs
        pass
    for e in _chain(exc):
        if isinstance(e, bce.SSLError):
            return False  # a certificate problem does not heal by waiting
        if isinstance(e, transient):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def as_storage_error(exc: BaseException, what: str = "storage call") -> StorageError | None:
    """Classify an exception from fsspec/s3fs/botocore or the OS as a :class:`StorageError`.

    s3fs turns botocore ``ClientError`` into Python errors (``NoSuchKey`` and
    ``NoSuchBucket`` both become ``FileNotFoundError``, ``AccessDenied`` and
    ``InvalidAccessKeyId`` both ``PermissionError``) and keeps the original as
    ``__cause__``; the S3 error code is read from there so the two can be told
    apart.

    Args:
        exc: what the storage call raised.
        what: the operation, for the message (e.g. ``"read s3://bucket/a.jpg"``).

    Returns:
        A StorageError whose ``transient`` attribute says whether to retry, or
        None for exceptions that are not about storage (programming errors),
        which callers should let through unchanged.
    """
    import botocore.exceptions as bce

    if isinstance(exc, StorageError):
        return exc
    if not isinstance(exc, _storage_exception_types()):
        return None
    code, http, message = _client_error(exc)
    detail = f"{code}: {message}" if code else f"{type(exc).__name__}: {exc}"
    kwargs = {"code": code or type(exc).__name__, "http_status": http}
    if code is not None:
        if code in _TRANSIENT_CODES or (http is not None and (http >= 500 or http == 429)):
            return _Transient(f"{what}: {detail}", **kwargs)
        if code == "NoSuchBucket":
            return NoSuchBucket(f"{what}: no such bucket ({detail})", **kwargs)
        if code in _NOT_FOUND_CODES:
            return ObjectNotFound(f"{what}: object not found ({detail})", **kwargs)
        if code in _REGION_CODES:
            return WrongRegion(f"{what}: wrong region for this bucket ({detail})", **kwargs)
        if code in _DENIED_CODES:
            return AccessDenied(f"{what}: access denied ({detail})", reason=_DENIED_CODES[code], **kwargs)
        return StorageError(f"{what}: {detail}", **kwargs)
    if _is_transient_exception(exc):
        return _Transient(f"{what}: {detail}", **kwargs)
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
        return AccessDenied(f"{what}: no usable credentials ({detail})", reason="no_credentials", **kwargs)
    if isinstance(exc, bce.SSLError):
        return StorageError(f"{what}: TLS failure ({detail})", reason="tls_error", **kwargs)
    if isinstance(exc, IsADirectoryError):
        return NotAnObject(f"{what}: is a folder, not an object", **kwargs)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return ObjectNotFound(f"{what}: object not found", **kwargs)
    if isinstance(exc, PermissionError):
        return AccessDenied(f"{what}: permission denied ({detail})", **kwargs)
    if isinstance(exc, (OSError, bce.BotoCoreError)):
        return StorageError(f"{what}: {detail}", **kwargs)
    return None


# --- retries ------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying transient failures.

    The defaults ride out a store that is down for ~10 s (the delays before
    attempts 2..8 are at least 0.1, 0.2, 0.4, 0.8, 1.6, 2, 2 s, at most twice
    that) and give up within ``deadline_s``.
    """

    attempts: int = 8  # total tries, the first included
    base_delay_s: float = 0.2  # delay before the 2nd try; doubles per try
    max_delay_s: float = 4.0  # cap on one delay
    deadline_s: float = 30.0  # no new try starts after this many seconds

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError(f"RetryPolicy needs 0 <= base_delay_s <= max_delay_s, got "
                             f"{self.base_delay_s} and {self.max_delay_s}")
        if self.deadline_s <= 0:
            raise ValueError(f"RetryPolicy.deadline_s must be > 0, got {self.deadline_s}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based): "equal jitter".

        Half of the exponential delay is fixed so that retries always back off,
        half is random so that many workers hit by one outage do not retry in step.
        """
        full = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return full / 2 + random.uniform(0, full / 2)


NO_RETRY = RetryPolicy(attempts=1)


def with_retry(fn: Callable[[], T], retry: RetryPolicy = RetryPolicy(), what: str = "storage call", *,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn()`` until it succeeds, retrying transient storage failures.

    Use it around any storage call that is safe to repeat (reads, listings,
    whole-object writes under a fixed or temporary name). For full control of
    the timing, run ``fn`` on a :func:`single_attempt` location so that s3fs and
    botocore do not retry underneath.

    Args:
        fn: the call, without arguments (use a lambda or functools.partial).
        retry: attempts, backoff and deadline.
        what: the operation and its URI, for messages and logs.
        sleep: replaced in tests.

    Returns:
        What ``fn`` returned.

    Raises:
        StorageUnavailable: transient failures went on for ``retry.attempts``
            tries or past ``retry.deadline_s``.
        StorageError: a permanent failure (not found, access denied, ...), at once.
        Exception: anything that is not a storage failure is raised unchanged.
    """
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            error = as_storage_error(exc, what)
            if error is None:
                raise
            if not error.transient:
                if error is exc:
                    raise
                raise error from exc
            elapsed = time.monotonic() - start
            delay = retry.delay(attempt)
            if attempt >= retry.attempts or elapsed + delay > retry.deadline_s:
                raise StorageUnavailable(
                    f"{error} (gave up after {attempt} attempts in {elapsed:.1f}s)",
                    attempts=attempt, elapsed_s=elapsed, code=error.code, http_status=error.http_status,
                ) from exc
            log.warning("%s (attempt %d of %d, retrying in %.2fs)", error, attempt, retry.attempts, delay)
            sleep(delay)


def single_attempt(location: Location) -> Location:
    """The same place on a filesystem that makes one HTTP attempt per call.

    For S3 this is a second s3fs instance with the same options plus botocore
    ``total_max_attempts=1`` and s3fs ``retries=1``, so that :func:`with_retry`
    alone decides when to try again. fsspec caches it like any other instance
    (its arguments differ from the plain one, so the plain one is untouched).
    Other filesystems do not retry and come back unchanged.
    """
    from s3fs import S3FileSystem

    fs = location.fs
    if not isinstance(fs, S3FileSystem) or fs.retries == 1:
        return location
    options = dict(fs.storage_options)
    config = dict(options.get("config_kwargs") or {})
    config["retries"] = {"total_max_attempts": 1, "mode": "standard"}
    options["config_kwargs"] = config
    twin = fsspec.filesystem("s3", **options)
    twin.retries = 1  # s3fs's own retry loop: a class attribute, not a constructor argument
    return Location(twin, location.path, location.scheme)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    from s3fs import S3FileSystem

    return isinstance(fs, S3FileSystem)


# --- reads and listings -------------------------------------------------------


def read_object(location: Location, max_bytes: int, retry: RetryPolicy = RetryPolicy()) -> bytes:
    """Read the first ``max_bytes + 1`` bytes of an object (all of it if smaller).

    One more byte than allowed is read so that the caller can tell "exactly
    max_bytes" from "too large" without a second request: ``len(data) >
    max_bytes`` means the object is too large. On S3 this is one ranged GET (no
    HEAD first), so a missing bucket is told apart from a missing key.

    Args:
        location: the object.
        max_bytes: the largest size the caller accepts (>= 0).
        retry: how long to retry transient failures.

    Returns:
        At most ``max_bytes + 1`` bytes.

    Raises:
        ObjectNotFound, NotAnObject: a problem with this object; at once.
        AccessDenied, NoSuchBucket, WrongRegion: systemic; at once.
        StorageUnavailable: transient failures outlasted ``retry``.
        StorageError: any other refusal by the store.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    what = f"read {location.uri}"
    target = single_attempt(location)
    fs, path = target.fs, target.path

    if _is_s3(fs):
        if not fs.split_path(path)[1]:
            raise NotAnObject(f"{what}: is a bucket, not an object")

        def attempt() -> bytes:
            try:
                return fs.cat_file(path, start=0, end=max_bytes + 1)
            except OSError as exc:
                # A range on an empty object is unsatisfiable (416); bytes=0-N is
                # satisfiable for every non-empty object, so this one is empty.
                if _client_error(exc)[0] == "InvalidRange":
                    return b""
                raise
    else:

        def attempt() -> bytes:
            with fs.open(path, "rb") as handle:
                return handle.read(max_bytes + 1)

    return with_retry(attempt, retry, what)


def list_folder(location: Location, retry: RetryPolicy = RetryPolicy()) -> list[str]:
    """Names (not paths) of the entries in a folder, sorted; [] if there is no folder.

    fsspec filesystems cache listings per instance (and fsspec shares instances
    per arguments), so a plain ``fs.ls`` can miss objects that another process
    wrote since this one last listed: a resume would then redo committed work.
    This drops the cached listing of the folder (and its parents) first, on both
    the given filesystem and the one the listing runs on.

    Raises:
        NoSuchBucket, AccessDenied, WrongRegion: systemic; at once.
        StorageUnavailable: transient failures outlasted ``retry``.
    """
    what = f"list {location.uri}"
    target = single_attempt(location)

    def attempt() -> list[str]:
        location.fs.invalidate_cache(location.path)
        target.fs.invalidate_cache(target.path)
        try:
            entries = target.fs.ls(target.path, detail=False)
        except FileNotFoundError as exc:
            if _client_error(exc)[0] == "NoSuchBucket":
                raise
            return []
        return sorted(posixpath.basename(entry.rstrip("/")) for entry in entries)

    return with_retry(attempt, retry, what)
