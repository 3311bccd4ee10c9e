"""A lease on an output folder, so that two runs never write one output at once.

The lease is a small JSON object ``_LEASE`` in the output folder (names that
start with ``_`` are ignored by Parquet readers)::

    {"run_id": ..., "host": ..., "pid": ..., "started": <unix s>, "heartbeat": <unix s>,
     "ttl_s": 120, "token": <uuid of this acquisition>, "info": {...}}

A run acquires it before touching the folder, renews it every ``heartbeat_s``
(a daemon thread does this) and deletes it when done. On local files an empty
``_LEASE.lock`` beside it stays for good (see below). A lease not renewed for
``ttl_s`` (the holder's own ttl, written in the file) is stale: its run is
taken to be dead and the next run takes the lease over, with a warning.

What is guaranteed (quotable in the README):

    On a local filesystem, acquiring, renewing, taking over and releasing the
    lease each run under an exclusive ``flock`` on ``_LEASE.lock`` beside it,
    and a new lease is created with an atomic exclusive ``link``: of several
    runs on one machine, at most one holds a live lease at any time (also on
    NFS, when the client passes ``flock`` to the server; clocks of the hosts
    must agree to well within ``ttl_s``). On AWS S3 (conditional writes since
    2024) and stores that honour them (moto; checked by the tests), the lease is created with
    ``If-None-Match: *`` and every renewal, takeover and release is
    conditional on the ETag last seen (``If-Match``), so at most one run can
    hold it: a run that raced and lost is refused with ``LeaseHeld``, and a
    holder whose lease was taken over finds out at its next renewal
    (``LeaseLost``) and never deletes the new holder's lease. Staleness on S3
    is judged by the store's own clock (``Date`` minus ``Last-Modified``), so
    client clocks do not matter. On S3-compatible stores that ignore
    conditional headers (detected on first use per bucket with a probe object
    beside the lease, and logged as a warning), the lease falls back to read,
    compare, write, wait ``settle_s`` (1 s), read back: two runs can then both
    believe they hold it, but only if one of them stalls for more than
    ``settle_s`` between its read and its write, and the loser finds out at
    its next renewal (``LeaseLost``, within ``heartbeat_s``). On every store,
    a holder that stalls for longer than ``ttl_s`` (suspended VM, long GC
    pause, partition) can be taken over while it still runs; it learns this
    at its next renewal, so a job should call :meth:`Lease.check` before each
    commit.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from fsspec.implementations.local import LocalFileSystem

from jobs.storage import (
    Location,
    RetryPolicy,
    StorageError,
    _client_error,
    _is_s3,
    as_storage_error,
    single_attempt,
    with_retry,
)

log = logging.getLogger(__name__)

LEASE = "_LEASE"


def machine_boot_id() -> str:
    """This machine's boot id (Linux), or "" where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """A live process's start time (clock ticks since boot, field 22 of /proc/PID/stat);
    None if no such process, "" if it cannot be told (not Linux, no access)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ""
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return stat.rsplit(")", 1)[1].split()[19]


def pid_space() -> str:
    """This process's pid namespace (the inode of /proc/self/ns/pid); "" where there is none."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


@dataclass(frozen=True)
class LeaseRecord:
    """What a lease file says about its holder. Times are unix seconds."""

    run_id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    ttl_s: float
    token: str  # unique per acquisition: tells two acquisitions by one run apart
    info: dict = field(default_factory=dict)
    boot: str = ""  # the holder machine's boot id: with host, says "this machine, this boot"
    pid_space: str = ""  # the holder's pid namespace: containers on one machine share the boot id
    pid_start: str = ""  # the holder process's start time (clock ticks since boot): tells a reused pid

    def died_here(self) -> bool:
        """True if the holder ran on this machine, in this boot and pid namespace, and its process is gone.

        A driver killed outright (``kill -9``, an OOM kill) cannot release its
        lease; a rerun on the same machine (the head node, for submitted jobs) need
        not wait out the ttl for it. Anything unknown answers False (wait for the ttl).
        """
        if not (self.boot and self.pid_space and self.pid_start) or self.pid == os.getpid():
            return False
        if (self.host, self.boot, self.pid_space) != (socket.gethostname(), machine_boot_id(), pid_space()):
            return False
        started = process_start(self.pid)
        return started is None or (started != "" and started != self.pid_start)  # gone, or the pid reused

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseRecord | None":
        """The record, or None if the bytes are not a lease written by this module."""
        try:
            raw = json.loads(data)
            return cls(run_id=str(raw["run_id"]), host=str(raw["host"]), pid=int(raw["pid"]),
                       started=float(raw["started"]), heartbeat=float(raw["heartbeat"]),
                       ttl_s=float(raw["ttl_s"]), token=str(raw["token"]), info=dict(raw.get("info") or {}),
                       boot=str(raw.get("boot") or ""), pid_space=str(raw.get("pid_space") or ""),
                       pid_start=str(raw.get("pid_start") or ""))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class _Seen:
    """A lease as read from the store."""

    record: LeaseRecord | None  # None: the file is there but unreadable
    version: str  # ETag on S3, a hash of the bytes elsewhere
    age_s: float  # seconds since the last write, by the store's clock where it has one


def _when(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class LeaseHeld(RuntimeError):
    """Another run holds a live lease on the output folder.

    Attributes:
        uri: the lease file.
        holder: the other run's lease record (None if its lease file is unreadable).
        age_s: seconds since its last heartbeat.
        ttl_s: seconds without a heartbeat after which it counts as stale.
    """

    def __init__(self, uri: str, holder: LeaseRecord | None, age_s: float, ttl_s: float) -> None:
        self.uri, self.holder, self.age_s, self.ttl_s = uri, holder, age_s, ttl_s
        if holder is None:
            who = f"another run (its lease file is unreadable; last written {age_s:.0f}s ago)"
        else:
            who = (f"run {holder.run_id!r} (host {holder.host}, pid {holder.pid}, started "
                   f"{_when(holder.started)}, last heartbeat {age_s:.0f}s ago)")
        super().__init__(
            f"{posixpath.dirname(uri)} is in use by {who}. Wait for that run to finish or stop it; "
            f"its lease goes stale {ttl_s:.0f}s after its last heartbeat. If it is certainly dead, "
            f"delete {uri}.")

    def __reduce__(self):  # picklable (Ray ships exceptions between processes)
        return type(self), (self.uri, self.holder, self.age_s, self.ttl_s)


class LeaseLost(RuntimeError):
    """Our lease was taken over (or removed) by someone else; stop writing."""


class _Conflict(Exception):
    """A conditional write found the lease changed since we read it."""


# --- stores -------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Store:
    """What every store reads the same way: the bytes, the record, its age."""

    def read(self) -> _Seen | None:
        data = self._bytes()
        if data is None:
            return None
        record = LeaseRecord.from_bytes(data)
        # A record that does not parse is aged by the file's own time.
        written = record.heartbeat if record else self._mtime()
        return _Seen(record, _digest(data), time.time() - written)


class _LocalStore(_Store):
    """Local (or NFS) files: every change under an exclusive flock on ``_LEASE.lock``."""

    conditional = True  # as good as: changes are serialised by the lock

    def __init__(self, folder: str) -> None:
        self.path = posixpath.join(folder, LEASE)
        self.lock_path = self.path + ".lock"
        self.folder = folder

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        # The lock file is never deleted: two runs must lock the same inode.
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _temporary(self, data: bytes) -> str:
        temporary = posixpath.join(self.folder, f"{LEASE}.{uuid.uuid4().hex}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return temporary

    def _bytes(self) -> bytes | None:
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def _mtime(self) -> float:
        return os.stat(self.path).st_mtime

    def create(self, data: bytes) -> str:
        os.makedirs(self.folder, exist_ok=True)
        with self._locked():
            temporary = self._temporary(data)
            try:
                os.link(temporary, self.path)  # atomic, fails if the lease exists (also on NFS)
            except FileExistsError:
                raise _Conflict() from None
            finally:
                os.unlink(temporary)
        return _digest(data)

    def replace(self, data: bytes, version: str) -> str:
        with self._locked():
            current = self._bytes()
            if current is None or _digest(current) != version:
                raise _Conflict()
            os.replace(self._temporary(data), self.path)
        return _digest(data)

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self._bytes()
            if current is None or _digest(current) != version:
                return False
            os.unlink(self.path)
        return True


class _FsspecStore(_Store):
    """Any fsspec filesystem, without conditional writes: check, then write (racy; see the module doc)."""

    conditional = False

    def __init__(self, location: Location) -> None:
        self.fs = location.fs
        self.path = location.join(LEASE).path

    def _bytes(self) -> bytes | None:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError as exc:
            if _client_error(exc)[0] == "NoSuchBucket":
                raise
            return None

    def _mtime(self) -> float:
        return self.fs.modified(self.path).timestamp()

    def create(self, data: bytes) -> str:
        if self._bytes() is not None:
            raise _Conflict()
        self.fs.pipe_file(self.path, data)
        return _digest(data)

    def replace(self, data: bytes, version: str) -> str:
        current = self._bytes()
        if current is None or _digest(current) != version:
            raise _Conflict()
        self.fs.pipe_file(self.path, data)
        return _digest(data)

    def delete(self, version: str) -> bool:
        current = self._bytes()
        if current is None or _digest(current) != version:
            return False
        self.fs.rm_file(self.path)
        return True


# (endpoint, bucket) -> whether the store honours If-None-Match / If-Match.
_CONDITIONAL_SUPPORT: dict[tuple[str, str], bool] = {}


def _precondition_failed(exc: BaseException) -> bool:
    code, http, _ = _client_error(exc)
    return code in ("PreconditionFailed", "412") or http == 412


class _S3Store(_FsspecStore):
    """S3 with conditional requests: create with If-None-Match, change with If-Match."""

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        self.bucket, self.key, _ = self.fs.split_path(self.path)
        endpoint = (self.fs.client_kwargs or {}).get("endpoint_url") or "aws"
        support_key = (endpoint, self.bucket)
        if support_key not in _CONDITIONAL_SUPPORT:
            _CONDITIONAL_SUPPORT[support_key] = with_retry(self._probe, RetryPolicy(),
                                                           f"probe conditional writes on s3://{self.bucket}")
            if not _CONDITIONAL_SUPPORT[support_key]:
                log.warning("s3://%s at %s ignores conditional writes (If-None-Match); the output "
                            "lease falls back to write and read back, which two runs started "
                            "within about a second of each other can both pass", self.bucket, endpoint)
        self.conditional = _CONDITIONAL_SUPPORT[support_key]

    def _probe(self) -> bool:
        """Whether the store refuses writes and deletes whose conditions fail, as S3 does.

        Some S3-compatible stores accept the headers and ignore them; a probe
        object beside the lease tells them apart. Three conditions must each be
        refused with 412: create over an existing key (If-None-Match: *), and
        overwrite and delete with an ETag that does not match (If-Match).
        """
        key = f"{self.key}.probe-{uuid.uuid4().hex}"
        wrong = '"' + "0" * 32 + '"'

        def refused(method: str, **kwargs) -> bool:
            try:
                self.fs.call_s3(method, Bucket=self.bucket, Key=key, **kwargs)
            except OSError as exc:
                if _precondition_failed(exc):
                    return True
                error = as_storage_error(exc)
                if error is not None and (error.transient or error.systemic):
                    raise
                return False  # refused as not implemented or invalid: no conditional writes here
            return False

        self.fs.call_s3("put_object", Bucket=self.bucket, Key=key, Body=b"probe")
        try:
            return (refused("put_object", Body=b"probe", IfNoneMatch="*")
                    and refused("put_object", Body=b"probe", IfMatch=wrong)
                    and refused("delete_object", IfMatch=wrong))
        finally:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key)

    def read(self) -> _Seen | None:
        try:
            response = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError as exc:
            if _client_error(exc)[0] == "NoSuchBucket":
                raise
            return None
        data = _read_body(self.fs, response)
        record = LeaseRecord.from_bytes(data)
        version = response["ETag"] if self.conditional else _digest(data)
        return _Seen(record, version, _server_age(response, record))

    def create(self, data: bytes) -> str:
        if not self.conditional:
            return super().create(data)
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data,
                                       IfNoneMatch="*")
        except OSError as exc:  # s3fs raises FileExistsError for this 412, OSError for others
            if _precondition_failed(exc):
                raise _Conflict() from None
            raise
        self.fs.invalidate_cache(self.path)
        return response["ETag"]

    def replace(self, data: bytes, version: str) -> str:
        if not self.conditional:
            return super().replace(data, version)
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data,
                                       IfMatch=version)
        except OSError as exc:
            if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                raise _Conflict() from None
            raise
        self.fs.invalidate_cache(self.path)
        return response["ETag"]

    def delete(self, version: str) -> bool:
        if not self.conditional:
            return super().delete(version)
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except OSError as exc:
            if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                return False
            raise
        self.fs.invalidate_cache(self.path)
        return True


def _read_body(fs, response: dict) -> bytes:
    """The body of a get_object response made through s3fs (an aiohttp stream on s3fs's loop)."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        try:
            return await response["Body"].read()
        finally:
            response["Body"].close()

    return sync(fs.loop, read)


def _server_age(response: dict, record: LeaseRecord | None) -> float:
    """Seconds since the object was written, by the store's clock (1 s resolution).

    Falls back on our clock and the record's heartbeat if the store sent no Date.
    """
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    modified = response.get("LastModified")
    if date and modified is not None:
        return max(0.0, (email.utils.parsedate_to_datetime(date) - modified).total_seconds())
    return time.time() - (record.heartbeat if record else modified.timestamp())


def _store_for(location: Location):
    if isinstance(location.fs, LocalFileSystem):
        return _LocalStore(location.path)
    if _is_s3(location.fs):
        return _S3Store(single_attempt(location))
    return _FsspecStore(location)


# --- the lease ----------------------------------------------------------------


class Lease:
    """This run's hold on an output folder. Get one with :meth:`acquire`.

    Typical use by a job runner::

        with Lease.acquire(output, run_id, info={"spec_hash": h}) as lease:
            ...                     # a daemon thread renews the lease meanwhile
            lease.check()           # before each commit: raises LeaseLost if taken over

    Attributes:
        uri: the lease file.
        record: what the lease file says now (ours).
        lost: the LeaseLost found by the heartbeat thread, or None.
    """

    def __init__(self, location: Location, store, record: LeaseRecord, version: str, heartbeat_s: float,
                 retry: RetryPolicy) -> None:
        self.location = location
        self.uri = location.join(LEASE).uri
        self.record = record
        self.heartbeat_s = heartbeat_s
        self.retry = retry
        self.lost: LeaseLost | None = None
        self._store = store
        self._version = version
        self._renewed = time.monotonic()
        self._released = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, location: Location, run_id: str, *, ttl_s: float = 120.0, heartbeat_s: float = 20.0,
                info: dict | None = None, retry: RetryPolicy = RetryPolicy(), settle_s: float = 1.0) -> "Lease":
        """Take the lease on an output folder, or refuse because another run holds it.

        A stale lease (not renewed for its holder's ``ttl_s``) is taken over with a
        warning. The heartbeat thread is not started: call :meth:`start_heartbeat`
        or use the lease as a context manager.

        Args:
            location: the output folder (it need not exist yet).
            run_id: this run's id, shown to any run that is refused.
            ttl_s: how long others wait after our last heartbeat before taking over.
            heartbeat_s: how often :meth:`start_heartbeat` renews; at most ttl_s / 3,
                so that one slow or failed renewal does not let the lease lapse.
            info: extra JSON-able facts for the lease file (spec hash, Ray job id...).
            retry: retries of transient storage failures during each step.
            settle_s: on stores without conditional writes, how long to wait
                before reading the lease back to see whether another run overwrote it.

        Raises:
            LeaseHeld: another run holds a live lease; the message names it.
            StorageError: the store failed (see :mod:`jobs.storage`).
        """
        if not run_id:
            raise ValueError("run_id must be a non-empty string")
        if not 0 < heartbeat_s <= ttl_s / 3:
            raise ValueError(f"need 0 < heartbeat_s <= ttl_s / 3, got heartbeat_s={heartbeat_s}, ttl_s={ttl_s}")
        store = _store_for(location)
        uri = location.join(LEASE).uri
        now = time.time()
        record = LeaseRecord(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), started=now,
                             heartbeat=now, ttl_s=float(ttl_s), token=uuid.uuid4().hex, info=dict(info or {}),
                             boot=machine_boot_id(), pid_space=pid_space(),
                             pid_start=process_start(os.getpid()) or "")
        data = record.to_bytes()
        seen = None
        for _ in range(5):  # each round ends in success, refusal, or a lost race
            seen = with_retry(store.read, retry, f"read {uri}")
            if seen is not None and seen.record is not None and seen.record.token == record.token:
                pass  # our write landed, though its reply was lost and the retry was refused
            elif seen is None:
                try:
                    with_retry(lambda: store.create(data), retry, f"create {uri}")
                except _Conflict:
                    continue
            else:
                ttl = seen.record.ttl_s if seen.record else ttl_s
                dead = seen.record is not None and seen.record.died_here()
                if seen.age_s <= ttl and not dead:
                    raise LeaseHeld(uri, seen.record, seen.age_s, ttl)
                holder = f"run {seen.record.run_id!r} on {seen.record.host}" if seen.record else "an unreadable lease"
                why = (f"its process {seen.record.pid} on this machine is gone" if dead
                       else f"no heartbeat for {seen.age_s:.0f}s (ttl {ttl:.0f}s)")
                log.warning("taking over the stale lease %s of %s: %s", uri, holder, why)
                try:
                    with_retry(lambda: store.replace(data, seen.version), retry, f"take over {uri}")
                except _Conflict:
                    continue
            if not store.conditional:
                time.sleep(settle_s)
            back = with_retry(store.read, retry, f"read back {uri}")
            if back is None or back.record is None or back.record.token != record.token:
                if back is None:
                    continue
                raise LeaseHeld(uri, back.record, back.age_s, back.record.ttl_s if back.record else ttl_s)
            lease = cls(location, store, record, back.version, heartbeat_s, retry)
            log.info("acquired the lease %s for run %r", uri, run_id)
            return lease
        if seen is not None:
            raise LeaseHeld(uri, seen.record, seen.age_s, seen.record.ttl_s if seen.record else ttl_s)
        raise StorageError(f"could not acquire {uri}: the lease kept changing under us")

    # -- renewal ---------------------------------------------------------------

    def heartbeat(self) -> None:
        """Renew the lease now.

        Raises:
            LeaseLost: the lease is no longer ours (taken over after we went
                quiet for longer than ttl, or deleted).
            StorageError: the store failed; the lease may still be ours.
        """
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if self._released:
                raise LeaseLost(f"{self.uri} was released")
            renewed = LeaseRecord(**{**asdict(self.record), "heartbeat": time.time()})
            try:
                version = with_retry(lambda: self._store.replace(renewed.to_bytes(), self._version), self.retry,
                                     f"renew {self.uri}")
            except _Conflict:
                seen = with_retry(self._store.read, self.retry, f"read {self.uri}")
                if seen is not None and seen.record is not None and seen.record.token == self.record.token:
                    # Our renewal landed but its reply was lost; keep the version it made.
                    self.record, self._version = seen.record, seen.version
                    self._renewed = time.monotonic()
                    return
                holder = (f"run {seen.record.run_id!r} (host {seen.record.host}, pid {seen.record.pid})"
                          if seen is not None and seen.record is not None else "nobody (it was deleted)")
                self.lost = LeaseLost(f"lost the lease {self.uri} of run {self.record.run_id!r}: "
                                      f"it is now held by {holder}")
                raise self.lost from None
            self.record, self._version = renewed, version
            self._renewed = time.monotonic()

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is known to be lost (or renewal has lapsed past ttl)."""
        if self.lost is None and time.monotonic() - self._renewed > self.record.ttl_s:
            self.lost = LeaseLost(f"the lease {self.uri} of run {self.record.run_id!r} was not renewed "
                                  f"for {time.monotonic() - self._renewed:.0f}s (ttl {self.record.ttl_s:.0f}s); "
                                  f"another run may have taken it over")
        if self.lost is not None:
            raise self.lost

    def start_heartbeat(self, on_lost: Callable[[LeaseLost], None] | None = None) -> "Lease":
        """Renew every ``heartbeat_s`` in a daemon thread until :meth:`release`.

        Failed renewals (store down) are logged and retried at the next beat. If
        the lease is lost, the thread records it in :attr:`lost` (so that
        :meth:`check` raises), calls ``on_lost`` and stops.
        """
        if self._thread is not None:
            return self

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    self.heartbeat()
                except LeaseLost as exc:
                    log.error("%s", exc)
                    break
                except Exception as exc:  # noqa: BLE001 - keep beating through storage trouble
                    log.warning("could not renew the lease %s: %s", self.uri, exc)
                    try:
                        self.check()
                    except LeaseLost as lost:
                        log.error("%s", lost)
                        break
            if self.lost is not None and on_lost is not None:
                on_lost(self.lost)

        self._thread = threading.Thread(target=beat, name=f"lease-heartbeat-{self.record.run_id}", daemon=True)
        self._thread.start()
        return self

    # -- release -----------------------------------------------------------------

    def release(self) -> bool:
        """Stop the heartbeat and delete the lease if it is still ours.

        Returns:
            True if our lease was deleted; False if it was no longer ours (taken
            over: the other run's lease is left alone) or already released.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_s + 60)
        with self._lock:
            if self._released:
                return False
            self._released = True
            deleted = with_retry(lambda: self._store.delete(self._version), self.retry, f"release {self.uri}")
        if deleted:
            log.info("released the lease %s of run %r", self.uri, self.record.run_id)
        else:
            log.warning("did not delete %s: it is no longer the lease of run %r", self.uri, self.record.run_id)
        return deleted

    def __enter__(self) -> "Lease":
        return self.start_heartbeat()

    def __exit__(self, *exc_info) -> None:
        self.release()
