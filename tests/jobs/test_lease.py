"""The output lease, on local files and on an S3 server (moto, which honours conditional writes)."""

from __future__ import annotations

import json
import pickle
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import pytest
import s3fs

import jobs.lease as lease_module
from jobs.lease import LEASE, Lease, LeaseHeld, LeaseLost
from jobs.spec import StorageSpec
from jobs.storage import Location, locate

BUCKET = "lease-tests"


@dataclass
class Store:
    """One kind of storage, and the timings that suit its clock."""

    kind: str
    folder: Callable[[], Location]  # a fresh output folder
    read: Callable[[Location], dict | None]  # the lease file, read by an outsider
    ttl_s: float  # short enough to go stale within a test
    stale_after_s: float  # sleep that makes a lease of ttl_s stale (S3 dates have 1 s resolution)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        def read_local(folder: Location) -> dict | None:
            path = tmp_path / folder.path / LEASE
            return json.loads(path.read_bytes()) if path.exists() else None

        return Store("local", lambda: locate(str(tmp_path / uuid.uuid4().hex)), read_local, 0.6, 0.9)

    url = request.getfixturevalue("s3_server")
    outsider = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url, "region_name": "eu-west-1"},
                                 skip_instance_cache=True)
    if not outsider.exists(BUCKET):
        outsider.mkdir(BUCKET, region_name="eu-west-1")
    spec = StorageSpec(endpoint_url=url, region="eu-west-1")

    def read_s3(folder: Location) -> dict | None:
        try:
            return json.loads(outsider.cat_file(f"{folder.path}/{LEASE}"))
        except FileNotFoundError:
            return None

    return Store("s3", lambda: locate(f"s3://{BUCKET}/out-{uuid.uuid4().hex}", spec), read_s3, 1.0, 2.2)


def test_second_run_is_refused_with_the_first_run_named(store):
    folder = store.folder()
    first = Lease.acquire(folder, "run-one", info={"spec_hash": "abc"})
    assert store.read(folder)["run_id"] == "run-one" and store.read(folder)["info"] == {"spec_hash": "abc"}
    with pytest.raises(LeaseHeld, match=r"is in use by run 'run-one' \(host .+, pid \d+, started .+ UTC, "
                                        r"last heartbeat \d+s ago\)") as info:
        Lease.acquire(folder, "run-two")
    assert info.value.holder.run_id == "run-one" and info.value.uri.endswith(f"/{LEASE}")
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
    assert store.read(folder)["token"] == first.record.token  # the refused run changed nothing
    assert first.release() is True and store.read(folder) is None
    second = Lease.acquire(folder, "run-two")
    assert store.read(folder)["run_id"] == "run-two"
    second.release()


def test_a_stale_lease_is_taken_over_and_its_old_holder_cannot_delete_it(store, caplog):
    folder = store.folder()
    old = Lease.acquire(folder, "crashed-run", ttl_s=store.ttl_s, heartbeat_s=store.ttl_s / 3)
    time.sleep(store.stale_after_s)  # no heartbeats: the run is presumed dead
    with caplog.at_level("WARNING", logger="jobs.lease"):
        new = Lease.acquire(folder, "new-run")
    assert any("taking over the stale lease" in r.getMessage() and "crashed-run" in r.getMessage()
               for r in caplog.records)
    assert store.read(folder)["run_id"] == "new-run"
    with pytest.raises(LeaseLost, match=r"lost the lease .* of run 'crashed-run': it is now held by run 'new-run'"):
        old.heartbeat()
    with pytest.raises(LeaseLost):
        old.check()
    assert old.release() is False  # not ours any more: left alone
    assert store.read(folder)["run_id"] == "new-run"
    assert new.release() is True and store.read(folder) is None


def test_the_heartbeat_thread_keeps_a_lease_live_past_its_ttl(store):
    folder = store.folder()
    lost = []
    with Lease.acquire(folder, "long-run", ttl_s=2 * store.ttl_s, heartbeat_s=0.2) as held:
        assert held.start_heartbeat(on_lost=lost.append) is held  # already beating: no second thread
        first_beat = store.read(folder)["heartbeat"]
        time.sleep(2 * store.ttl_s + store.stale_after_s)
        with pytest.raises(LeaseHeld, match="run 'long-run'"):
            Lease.acquire(folder, "impatient-run")
        assert store.read(folder)["heartbeat"] > first_beat
        held.check()  # still ours
    assert store.read(folder) is None and not lost  # the context manager released it


def test_the_heartbeat_thread_notices_a_takeover(store):
    folder = store.folder()
    lost = []
    held = Lease.acquire(folder, "paused-run", ttl_s=store.ttl_s, heartbeat_s=store.ttl_s / 3)
    time.sleep(store.stale_after_s)  # as if the process had been suspended
    usurper = Lease.acquire(folder, "usurper")
    held.start_heartbeat(on_lost=lost.append)
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and "now held by run 'usurper'" in str(lost[0])
    with pytest.raises(LeaseLost):
        held.check()
    assert held.release() is False and store.read(folder)["run_id"] == "usurper"
    usurper.release()


def test_racing_runs_get_one_lease(store):
    folder = store.folder()
    start = threading.Barrier(4)
    won, refused = [], []

    def run(name: str) -> None:
        start.wait()
        try:
            won.append(Lease.acquire(folder, name))
        except LeaseHeld as exc:
            refused.append(exc)

    threads = [threading.Thread(target=run, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(won) == 1 and len(refused) == 3
    assert all(exc.holder.run_id == won[0].record.run_id for exc in refused)
    won[0].release()


def test_s3_store_that_ignores_conditions_falls_back_to_read_back(s3_server, monkeypatch):
    spec = StorageSpec(endpoint_url=s3_server, region="eu-west-1")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server, "region_name": "eu-west-1"},
                           skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET, region_name="eu-west-1")
    monkeypatch.setitem(lease_module._CONDITIONAL_SUPPORT, (s3_server, BUCKET), False)
    folder = locate(f"s3://{BUCKET}/best-effort-{uuid.uuid4().hex}", spec)
    first = Lease.acquire(folder, "run-one", settle_s=0.1)
    assert first._store.conditional is False
    with pytest.raises(LeaseHeld, match="run 'run-one'"):
        Lease.acquire(folder, "run-two", settle_s=0.1)
    first.heartbeat()
    assert first.release() is True
    Lease.acquire(folder, "run-two", settle_s=0.1).release()


def test_moto_is_probed_as_honouring_conditional_writes(s3_server):
    folder = locate(f"s3://{BUCKET}/probe-{uuid.uuid4().hex}", StorageSpec(endpoint_url=s3_server,
                                                                          region="eu-west-1"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server, "region_name": "eu-west-1"},
                           skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET, region_name="eu-west-1")
    lease_module._CONDITIONAL_SUPPORT.pop((s3_server, BUCKET), None)
    held = Lease.acquire(folder, "run-one")
    assert held._store.conditional is True
    assert [p.rsplit("/", 1)[-1] for p in fs.find(folder.path)] == [LEASE]  # the probe object is gone
    held.release()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"need 0 < heartbeat_s <= ttl_s / 3, got heartbeat_s=60, ttl_s=120"):
        Lease.acquire(locate(str(tmp_path)), "run", ttl_s=120, heartbeat_s=60)
    with pytest.raises(ValueError, match="run_id must be a non-empty string"):
        Lease.acquire(locate(str(tmp_path)), "")


def test_a_lease_whose_holder_was_killed_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    """A driver killed with SIGKILL cannot release its lease; a rerun here need not wait out the ttl."""
    import signal
    import subprocess
    import sys

    folder = locate(str(tmp_path / "out"))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from jobs.lease import Lease\nfrom jobs.storage import locate\n"
        f"Lease.acquire(locate({str(tmp_path / 'out')!r}), 'killed-run', ttl_s=600, heartbeat_s=60)\n"
        "print('held', flush=True)\ntime.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeld, match="'killed-run'"):  # alive: held, however old
        Lease.acquire(folder, "rerun")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level("WARNING", logger="jobs.lease"):
        rerun = Lease.acquire(folder, "rerun")
    assert any(f"its process {holder.pid} on this machine is gone" in r.getMessage() for r in caplog.records)
    rerun.release()

    # The same dead pid written by another machine (boot id), or by another container on this one (pid
    # namespace), proves nothing: wait for the ttl.
    record = json.loads(Lease.acquire(folder, "elsewhere").record.to_bytes())
    for elsewhere in ({"boot": "another-boot"}, {"pid_space": "4026531999"}):
        (tmp_path / "out" / LEASE).write_text(json.dumps({**record, "pid": holder.pid, **elsewhere}))
        with pytest.raises(LeaseHeld, match="'elsewhere'"):
            Lease.acquire(folder, "rerun")
    # A live process here under the holder's pid but started at another time: the pid was reused, the holder is gone.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "out" / LEASE).write_text(json.dumps({**record, "pid": alive.pid, "pid_start": "1"}))
        Lease.acquire(folder, "rerun").release()
        (tmp_path / "out" / LEASE).write_text(json.dumps({**record, "pid": alive.pid,
                                                           "pid_start": lease_module.process_start(alive.pid)}))
        with pytest.raises(LeaseHeld, match="'elsewhere'"):  # the holder itself, alive
            Lease.acquire(folder, "rerun")
    finally:
        alive.kill()
        alive.wait()
