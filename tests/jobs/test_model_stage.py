"""The model stage's batching, retries and loud failure, and the progress line, without Ray."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest

from jobs.progress import Progress, first_real_error
from jobs.stages import DEVICE_COLUMN, ModelFailure, ModelStage

SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("error", pa.string()), ("score", pa.float32())])


class Doubler(ModelStage):
    """Scores a row as twice its key; fails on batches larger than ``max_batch`` and on keys in ``poison``."""

    output_schema = SCHEMA

    def __init__(self, max_batch: int = 100, poison: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_batch, self.poison, self.calls = max_batch, poison, []

    def infer(self, rows):
        self.calls.append(len(rows))
        if len(rows) > self.max_batch:
            raise RuntimeError("CPU out of memory: tried to allocate 9 GiB")
        if any(row["key"] in self.poison for row in rows):
            raise ValueError("bad input")
        return [{"score": 2.0 * int(row["key"])} for row in rows]


def _batch(keys, statuses=None):
    statuses = statuses or ["ok"] * len(keys)
    return pa.table({"key": keys, "status": statuses, "error": [None] * len(keys),
                     "score": pa.nulls(len(keys), pa.float32())}, schema=SCHEMA)


def test_sub_batches_and_passes_failed_rows_through():
    stage = Doubler(batch_size=3)
    out = stage(_batch(["1", "2", "3", "4", "5", "6", "7"], ["ok"] * 6 + ["no_face"])).to_pylist()
    assert stage.calls == [3, 3]
    assert [row["score"] for row in out] == [2, 4, 6, 8, 10, 12, None]
    assert out[-1]["status"] == "no_face" and {row[DEVICE_COLUMN] for row in out} == {"cpu"}


def test_a_batch_too_large_is_retried_in_halves_and_every_row_comes_out_ok():
    stage = Doubler(batch_size=8, max_batch=2)
    out = stage(_batch([str(i) for i in range(8)])).to_pylist()
    assert [row["status"] for row in out] == ["ok"] * 8
    assert [row["score"] for row in out] == [2.0 * i for i in range(8)]
    assert stage.calls == [8, 4, 2, 2, 4, 2, 2]


def test_only_the_row_that_fails_alone_becomes_model_error():
    stage = Doubler(batch_size=4, poison=("3",))
    out = stage(_batch(["1", "2", "3", "4"])).to_pylist()
    assert [row["status"] for row in out] == ["ok", "ok", "model_error", "ok"]
    assert out[2]["error"] == "ValueError: bad input" and out[2]["score"] is None


def test_a_model_that_fails_every_row_stops_the_job():
    stage = Doubler(batch_size=2, poison=tuple(str(i) for i in range(100)))
    stage(_batch(["1", "2"]))
    stage(_batch(["3"]))
    stage(_batch(["7"], ["decode_error"]))  # nothing for the model: neither a failure nor a success
    with pytest.raises(ModelFailure, match="every row of 3 blocks in a row; last error: ValueError: bad input"):
        stage(_batch(["4", "5"]))
    healthy = Doubler(batch_size=2, poison=("1",))
    for _ in range(5):
        healthy(_batch(["1"]))
        healthy(_batch(["2"]))  # a success between failures resets the count


def test_a_broken_device_ends_the_actor_so_ray_retries_on_a_fresh_one(monkeypatch):
    import jobs.stages

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(jobs.stages, "exit_process", fake_exit)

    class Broken(Doubler):
        def infer(self, rows):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(SystemExit):
        Broken(batch_size=4)(_batch(["1", "2"]))
    assert exits == [1]


def test_cuda_required_without_cuda_fails_at_once_and_auto_falls_back_with_a_label():
    with pytest.raises(ModelFailure, match="resources.device: cuda, but the model actor sees no CUDA device"):
        Doubler(device="cuda", wants_gpu=True)
    assert Doubler(device="auto", wants_gpu=True).device_label == "cpu (fallback: GPUs asked, no CUDA visible)"


def test_progress_line_counts_rate_and_eta():
    stream = io.StringIO()
    progress = Progress(total=100, stream=stream, interval_s=0.0)
    progress.started -= 10.0  # ten seconds in
    progress.update(40, {"ok": 38, "no_face": 2})
    line = stream.getvalue().strip()
    assert line.startswith("40/100 rows (40%)  4.0 rows/s  ETA 0:15")
    assert line.endswith("no_face=2 ok=38") and "\r" not in stream.getvalue()
    progress.update(60, {"ok": 60})
    progress.close()  # the last line was just shown: not again
    assert stream.getvalue().count("100/100 rows") == 1
    quiet = io.StringIO()
    Progress(total=5, stream=quiet, enabled=False).update(5, {"ok": 5})
    assert quiet.getvalue() == ""


def test_first_real_error_digs_out_the_users_exception():
    class UserCodeException(Exception):
        pass

    inner = KeyError("model.safetensors")
    try:
        try:
            raise inner
        except KeyError as exc:
            raise UserCodeException("Traceback...\n  File x\nKeyError: 'model.safetensors'\n\nTo change retry "
                                    "attempts, configure `ray.data.DataContext`") from exc
    except UserCodeException as wrapped:
        assert first_real_error(wrapped) == "KeyError: 'model.safetensors'"
