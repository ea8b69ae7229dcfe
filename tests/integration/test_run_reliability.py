"""The runner's guarantees: one owner per run, failed videos recorded, merges that lose nothing,
nothing written before everything is checked."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mukv.errors import ModelLoadError
from mukv.eval.runner import (
    RunConfig,
    RunError,
    RunLock,
    Shard,
    merge_predictions,
    read_failures,
    read_predictions,
    run_benchmark,
)
from mukv.eval.synthetic import write_benchmark
from tests.integration.test_runner import prediction_record, strip


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write_benchmark(tmp_path_factory.mktemp("bench"), videos=2, duration=16.0, scene_seconds=4.0)


def config(annotation: Path, videos: Path, model, method: str = "full", **kw) -> RunConfig:
    values = {"npy_fps": 2.0, "max_new_tokens": 2} | kw
    return RunConfig(
        benchmark=values.pop("benchmark", "rvs-ego"),
        annotation=str(annotation),
        videos=str(videos),
        model=str(model),
        method=method,
        **values,
    )


def copy_videos(bench: Path, tmp_path: Path) -> Path:
    videos = tmp_path / "videos"
    shutil.copytree(bench.parent / "videos", videos)
    return videos


def damage_middle(path: Path, seed: int = 0) -> None:
    """Overwrite bytes inside an mp4's frame data with noise (a damaged recording: the file opens,
    and decoding fails part way). Decoders conceal some damage, so places are tried until one
    makes decoding fail after the first frame."""
    from mukv.errors import VideoError
    from mukv.video import open_video

    original = path.read_bytes()
    start, end = original.find(b"mdat"), original.find(b"moov")
    assert 0 < start < end, "expected an mp4 with its frame data before its index"
    noise = np.random.default_rng(seed).integers(0, 256, 400, dtype=np.uint8).tobytes()
    for fifths in (3, 2, 4, 1):
        for size in (100, 400):
            at = start + (end - start) * fifths // 5
            data = bytearray(original)
            data[at : at + size] = noise[:size]
            path.write_bytes(bytes(data))
            try:
                source = open_video(path, sample_fps=0.5)
            except VideoError:
                continue  # damaged too early: the file does not open
            try:
                while source.next_batch(8) is not None:
                    pass
            except VideoError:
                return  # fails part way, as wanted
    raise AssertionError(f"could not damage {path} so that decoding fails part way")


def questions_of(bench: Path) -> dict[str, list[str]]:
    return {
        v["video_id"]: [f"{v['video_id']}/{i}" for i in range(len(v["conversations"]))]
        for v in json.loads(bench.read_text())
    }


# --------------------------------------------------------------------------------------------
# one owner per run directory


def test_a_second_process_on_a_run_directory_is_refused_naming_the_owner(bench, tiny_model_dir, backend, tmp_path):
    cfg = config(bench, bench.parent / "videos", tiny_model_dir)
    out = tmp_path / "run"
    out.mkdir()
    owner = rf"being written by another process \(pid {os.getpid()} on "
    with RunLock(out / "predictions.jsonl"), pytest.raises(RunError, match=owner):  # another writer holds the run
        run_benchmark(cfg, out, backend=backend, limit=1)
    assert not (out / "predictions.jsonl").exists()
    assert run_benchmark(cfg, out, backend=backend, limit=1).answered == 1  # released: the run goes on


def test_a_lock_left_by_a_dead_process_is_taken_over(bench, tiny_model_dir, backend, tmp_path, caplog):
    cfg = config(bench, bench.parent / "videos", tiny_model_dir)
    out = tmp_path / "run"
    out.mkdir()
    owner = {"pid": 2**22 + 17, "host": "gone", "command": ["mukv", "eval"], "started": "2026-01-01T00:00:00Z"}
    (out / "predictions.jsonl.lock").write_text(json.dumps(owner))
    with caplog.at_level(logging.WARNING, logger="mukv.eval.runner"):
        assert run_benchmark(cfg, out, backend=backend, limit=1).answered == 1
    assert "taking over" in caplog.text and "pid 4194321 on gone" in caplog.text
    assert (out / "predictions.jsonl.lock").read_text() == ""  # released cleanly


def test_shards_of_one_run_write_side_by_side(bench, tiny_model_dir, backend, tmp_path):
    cfg = config(bench, bench.parent / "videos", tiny_model_dir)
    with RunLock(tmp_path / Shard(0, 2).filename):  # shard 0 is running elsewhere
        assert run_benchmark(cfg, tmp_path, backend=backend, shard=Shard(1, 2), limit=1).answered == 1
        with pytest.raises(RunError, match="being written"):
            run_benchmark(cfg, tmp_path, backend=backend, shard=Shard(0, 2), limit=1)


# --------------------------------------------------------------------------------------------
# merge


def test_merge_refuses_missing_shards_naming_them_and_their_questions(bench, tiny_model_dir, backend, tmp_path):
    cfg = config(bench, bench.parent / "videos", tiny_model_dir)
    run_benchmark(cfg, tmp_path, backend=backend, shard=Shard(0, 2))
    per_video = questions_of(bench)
    missing = len(per_video["synthetic_001"])  # shard 1 of 2 holds video 1
    with pytest.raises(RunError, match=rf"shard 1 of 2 is missing \({missing} questions\).*--allow-partial"):
        merge_predictions(tmp_path)
    assert not (tmp_path / "predictions.jsonl").exists()
    merged = read_predictions(merge_predictions(tmp_path, allow_partial=True))
    assert len(merged) == len(per_video["synthetic_000"])


def test_merge_keeps_the_records_already_merged(bench, tiny_model_dir, backend, tmp_path):
    cfg = config(bench, bench.parent / "videos", tiny_model_dir)
    run_benchmark(cfg, tmp_path, backend=backend)  # unsharded: every question
    whole = read_predictions(tmp_path / "predictions.jsonl")
    # Shard 1 of 2 run elsewhere and copied in: only its video's records.
    shard = [r for r in whole if r["video_id"] == "synthetic_001"]
    (tmp_path / Shard(1, 2).filename).write_text("".join(json.dumps(r) + "\n" for r in shard))
    merged = read_predictions(merge_predictions(tmp_path))  # shard 0's questions are all in the merged file
    assert len(merged) == len(whole) == sum(len(q) for q in questions_of(bench).values())
    assert {r["qid"]: strip(r) for r in merged} == {r["qid"]: strip(r) for r in whole}


def test_a_sharded_run_after_an_unsharded_one_answers_nothing_twice(bench, tiny_model_dir, backend, tmp_path):
    cfg = config(bench, bench.parent / "videos", tiny_model_dir)
    first = run_benchmark(cfg, tmp_path, backend=backend, limit=3)
    again = run_benchmark(cfg, tmp_path, backend=backend, shard=Shard(0, 2))
    per_video = questions_of(bench)
    assert again.skipped_done == first.answered
    assert again.answered == len(per_video["synthetic_000"]) - first.answered
    answered = [r["qid"] for p in tmp_path.glob("predictions*.jsonl") for r in read_predictions(p)]
    assert len(answered) == len(set(answered))


def test_merge_refuses_while_a_shard_is_written(bench, tiny_model_dir, backend, tmp_path):
    cfg = config(bench, bench.parent / "videos", tiny_model_dir)
    for index in range(2):
        run_benchmark(cfg, tmp_path, backend=backend, shard=Shard(index, 2), limit=1)
    with RunLock(tmp_path / Shard(1, 2).filename), pytest.raises(RunError, match=r"still being written: shard 1 \(pid"):
        merge_predictions(tmp_path, allow_partial=True)


def test_records_differing_only_in_timings_are_not_a_conflict(tmp_path):
    record = prediction_record()
    (tmp_path / "predictions.shard-0-of-2.jsonl").write_text(json.dumps(record) + "\n")
    slower = record | {"total_seconds": 9.0, "encode_seconds": 3.0, "peak_rss_bytes": 7, "frames_encoded": 9}
    (tmp_path / "predictions.shard-1-of-2.jsonl").write_text(json.dumps(slower) + "\n")
    merged = read_predictions(merge_predictions(tmp_path, allow_partial=True))
    assert merged == [record]


# --------------------------------------------------------------------------------------------
# failed videos and questions


def test_a_video_that_fails_to_decode_is_recorded_and_the_run_goes_on(bench, tiny_model_dir, backend, tmp_path):
    videos = copy_videos(bench, tmp_path)
    damage_middle(videos / "synthetic_000.mp4")
    cfg = config(bench, videos, tiny_model_dir)
    out = tmp_path / "run"
    summary = run_benchmark(cfg, out, backend=backend)
    per_video = questions_of(bench)
    assert summary.failed_videos == ["synthetic_000"]
    [failure] = summary.failed
    assert failure["stage"] == "decode" and "decoding failed after the frame at" in failure["reason"]
    records = read_predictions(out / "predictions.jsonl")
    answered = {r["qid"] for r in records}
    assert set(per_video["synthetic_001"]) <= answered  # the run went on
    # Every question of the broken video is answered (before the damage) or listed as failed.
    assert sorted(set(per_video["synthetic_000"]) - answered) == sorted(failure["qids"])
    assert failure["qids"] and summary.failed_questions == len(failure["qids"])
    assert read_failures(out / "failures.jsonl").keys() == {"synthetic_000"}

    # A re-run does not stop at the same video, and does not retry it unless asked.
    again = run_benchmark(cfg, out, backend=backend)
    assert again.answered == 0 and again.skipped_failed == len(failure["qids"])
    assert again.failed_videos == ["synthetic_000"]

    # With the file repaired, --retry-failed answers exactly the missing questions.
    shutil.copy(bench.parent / "videos" / "synthetic_000.mp4", videos / "synthetic_000.mp4")
    retried = run_benchmark(cfg, out, backend=backend, retry_failed=True)
    assert retried.answered == len(failure["qids"]) and retried.failed == []
    records = read_predictions(out / "predictions.jsonl")
    assert len(records) == len({r["qid"] for r in records}) == sum(len(q) for q in per_video.values())
    assert read_failures(out / "failures.jsonl") == {}


def test_a_video_that_cannot_be_opened_is_recorded(bench, tiny_model_dir, backend, tmp_path):
    videos = copy_videos(bench, tmp_path)
    data = (videos / "synthetic_000.mp4").read_bytes()
    (videos / "synthetic_000.mp4").write_bytes(data[: len(data) // 2])  # cut short: no index
    summary = run_benchmark(config(bench, videos, tiny_model_dir), tmp_path / "run", backend=backend)
    [failure] = summary.failed
    assert failure["video_id"] == "synthetic_000" and failure["stage"] == "open"
    assert sorted(failure["qids"]) == sorted(questions_of(bench)["synthetic_000"])
    assert summary.answered == len(questions_of(bench)["synthetic_001"])


def write_mkv(path: Path, seconds: float, fps: int = 4) -> Path:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_a_truncated_file_is_reported_and_questions_past_its_end_are_flagged(tiny_model_dir, backend, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    full = write_mkv(videos / "walk.mkv", seconds=20.0)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])  # the recording stopped half way; the header says 20 s
    annotation = tmp_path / "anno.json"
    questions = [{"question": "What now?", "answer": "x", "time": t} for t in (2.0, 18.0)]
    annotation.write_text(json.dumps([{"video_id": "walk", "video": "walk.mkv", "questions": questions}]))
    cfg = config(annotation, videos, tiny_model_dir, benchmark="generic")
    summary = run_benchmark(cfg, tmp_path / "run", backend=backend)
    [warning] = summary.warnings
    assert "walk.mkv declares 20.0 s but its frames end at" in warning and "truncated" in warning
    early, late = read_predictions(tmp_path / "run" / "predictions.jsonl")
    assert "past_end" not in early
    assert late["past_end"] is True and late["video_end"] < 12.0


def test_a_question_the_model_cannot_take_is_recorded_and_the_video_goes_on(tiny_model_dir, backend, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_mkv(videos / "walk.mkv", seconds=8.0)
    long = "why " * (backend.text.max_positions + 10)
    questions = [{"question": q, "answer": "x", "time": t} for q, t in (("What?", 2.0), (long, 4.0), ("And?", 6.0))]
    annotation = tmp_path / "anno.json"
    annotation.write_text(json.dumps([{"video_id": "walk", "video": "walk.mkv", "questions": questions}]))
    summary = run_benchmark(config(annotation, videos, tiny_model_dir, benchmark="generic"), tmp_path, backend=backend)
    assert summary.answered == 2
    [failure] = summary.failed
    assert failure["key"] == "walk/1" and failure["stage"] == "question" and "longer than" in failure["reason"]
    assert [r["qid"] for r in read_predictions(tmp_path / "predictions.jsonl")] == ["walk/0", "walk/2"]


# --------------------------------------------------------------------------------------------
# nothing written before everything is checked


def test_a_failed_start_writes_nothing_and_a_corrected_command_runs(bench, tiny_model_dir, backend, tmp_path):
    out = tmp_path / "run"
    videos = bench.parent / "videos"
    with pytest.raises(RunError, match=r"\.npy frame arrays.*--npy-fps"):
        run_benchmark(config(bench, videos, tiny_model_dir, npy_fps=None), out, backend=backend)
    with pytest.raises(ModelLoadError):
        run_benchmark(config(bench, videos, tmp_path / "no-such-model"), out)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_benchmark(config(bench, videos, tiny_model_dir, max_new_tokens=0), out, backend=backend)
    assert not (out / "run.json").exists()
    assert run_benchmark(config(bench, videos, tiny_model_dir), out, backend=backend, limit=1).answered == 1


def test_a_run_directory_without_records_may_be_reconfigured(bench, tiny_model_dir, backend, tmp_path):
    videos = bench.parent / "videos"
    run_benchmark(config(bench, videos, tiny_model_dir, method="full"), tmp_path, backend=backend, limit=1)
    (tmp_path / "predictions.jsonl").write_text("")  # the records were removed by hand
    run_benchmark(config(bench, videos, tiny_model_dir, method="uniform"), tmp_path, backend=backend, limit=1)
    assert json.loads((tmp_path / "run.json").read_text())["config"]["method"] == "uniform"
    with pytest.raises(RunError, match="another configuration"):
        run_benchmark(config(bench, videos, tiny_model_dir, method="full"), tmp_path, backend=backend, limit=1)


def test_out_must_be_a_directory(bench, tiny_model_dir, backend, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(RunError, match="exists and is not a directory"):
        run_benchmark(config(bench, bench.parent / "videos", tiny_model_dir), out, backend=backend)


def test_a_truncated_run_file_is_named(bench, tiny_model_dir, backend, tmp_path):
    run_benchmark(config(bench, bench.parent / "videos", tiny_model_dir), tmp_path, backend=backend, limit=1)
    (tmp_path / "run.json").write_text('{"identity": {"bench')
    with pytest.raises(RunError, match=r"run\.json: the run's configuration is damaged or truncated"):
        run_benchmark(config(bench, bench.parent / "videos", tiny_model_dir), tmp_path, backend=backend, limit=1)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"[1, 2]\n", "line 2 is not a prediction record (a JSON list)"),
        (b'{"qid": "v/1"}\n', "line 2 is not a prediction record (field 'video_id'"),
        (b"\x00\x00\x00\n", "line 2 holds NUL bytes"),
        (b"\xff\xfe{}\n", "line 2 is not UTF-8"),
    ],
)
def test_damaged_prediction_lines_are_named(tmp_path, line, message):
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(json.dumps(prediction_record()).encode() + b"\n" + line)
    with pytest.raises(RunError, match=re_escape(message)):
        read_predictions(path)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# --------------------------------------------------------------------------------------------
# edges found in review


def test_a_max_new_tokens_that_leaves_no_room_fails_before_anything_is_written(
    bench, tiny_model_dir, backend, tmp_path
):
    limit = backend.text.max_positions
    cfg = config(bench, bench.parent / "videos", tiny_model_dir, max_new_tokens=limit - 8)
    with pytest.raises(ValueError, match=rf"--max-new-tokens {limit - 8}: question synthetic_000/\d+: question:"):
        run_benchmark(cfg, tmp_path, backend=backend)
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "failures.jsonl").exists()


def stream_failing_after(real_open, seconds: float):
    """An ``open_source`` whose files decode up to ``seconds`` and then fail (a damaged recording)."""
    from mukv.errors import VideoError
    from mukv.video.sources import FrameStream

    def open_source(path, **kw):
        source = real_open(path, **kw)

        def frames():
            while (batch := source.next_batch(1)) is not None:
                if batch.timestamps[0] > seconds:
                    raise VideoError(f"{path}: decoding failed after the frame at {seconds:.1f} s")
                yield batch.frames[0], float(batch.timestamps[0])

        return FrameStream(frames(), name=str(path), duration=source.duration)

    return open_source


def test_a_question_whose_frames_were_all_decoded_is_answered_before_the_failure(
    tiny_model_dir, backend, tmp_path, monkeypatch
):
    import mukv.video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_mkv(videos / "walk.mkv", seconds=12.0)
    questions = [{"question": "What?", "answer": "x", "time": t} for t in (2.0, 4.0, 9.0)]
    annotation = tmp_path / "anno.json"
    annotation.write_text(json.dumps([{"video_id": "walk", "video": "walk.mkv", "questions": questions}]))
    # Frames are sampled every 2 s: the frame after 4.0 s fails; the question at 4.0 s has all it needs.
    monkeypatch.setattr(mukv.video, "open_source", stream_failing_after(mukv.video.open_source, 4.0))
    summary = run_benchmark(config(annotation, videos, tiny_model_dir, benchmark="generic"), tmp_path, backend=backend)
    assert [r["qid"] for r in read_predictions(tmp_path / "predictions.jsonl")] == ["walk/0", "walk/1"]
    [failure] = summary.failed
    assert failure["stage"] == "decode" and failure["qids"] == ["walk/2"] and failure["stream_time"] == 4.0


def test_a_half_written_failure_line_is_repaired(bench, tiny_model_dir, backend, tmp_path):
    videos = copy_videos(bench, tmp_path)
    (videos / "synthetic_000.mp4").write_bytes(b"not a video")
    cfg = config(bench, videos, tiny_model_dir)
    out = tmp_path / "run"
    out.mkdir()
    (out / "failures.jsonl").write_text('{"key": "synthetic_00')  # an interrupted write
    run_benchmark(cfg, out, backend=backend)
    run_benchmark(cfg, out, backend=backend)
    assert list(read_failures(out / "failures.jsonl")) == ["synthetic_000"]


def test_retry_with_a_limit_keeps_every_failed_question_listed(bench, tiny_model_dir, backend, tmp_path):
    videos = copy_videos(bench, tmp_path)
    (videos / "synthetic_000.mp4").write_bytes(b"not a video")
    cfg = config(bench, videos, tiny_model_dir)
    [failure] = run_benchmark(cfg, tmp_path, backend=backend).failed
    retried = run_benchmark(cfg, tmp_path, backend=backend, retry_failed=True, limit=1)
    assert sorted(retried.failed[0]["qids"]) == sorted(failure["qids"])


def test_a_shard_waits_for_the_run_file_lock(bench, tiny_model_dir, backend, tmp_path):
    import threading

    cfg = config(bench, bench.parent / "videos", tiny_model_dir)
    lock = RunLock(tmp_path / "run.json").acquire()
    threading.Timer(1.0, lock.release).start()  # another shard writing run.json for a moment
    assert run_benchmark(cfg, tmp_path, backend=backend, shard=Shard(1, 2), limit=1).answered == 1


def test_a_directory_another_process_runs_is_not_reconfigured(bench, tiny_model_dir, backend, tmp_path):
    videos = bench.parent / "videos"
    run_benchmark(config(bench, videos, tiny_model_dir), tmp_path, backend=backend, shard=Shard(0, 2), limit=1)
    (tmp_path / Shard(0, 2).filename).write_text("")  # shard 0 is running and has written nothing yet
    with RunLock(tmp_path / Shard(0, 2).filename), pytest.raises(RunError, match="being run with another config"):
        run_benchmark(
            config(bench, videos, tiny_model_dir, max_new_tokens=3), tmp_path, backend=backend, shard=Shard(1, 2)
        )
    assert json.loads((tmp_path / "run.json").read_text())["config"]["max_new_tokens"] == 2


def test_checking_a_lock_changes_nothing(tmp_path, caplog):
    stale = {"pid": 2**22 + 17, "host": "gone", "command": ["mukv"], "started": "2026-01-01T00:00:00Z"}
    (tmp_path / "predictions.jsonl.lock").write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING):
        assert RunLock(tmp_path / "predictions.jsonl").owner() is None
    assert caplog.text == "" and json.loads((tmp_path / "predictions.jsonl.lock").read_text()) == stale


def test_a_lock_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "predictions.jsonl.lock").mkdir()
    with pytest.raises(RunError, match=r"predictions\.jsonl\.lock: cannot create the lock file"):
        RunLock(tmp_path / "predictions.jsonl").acquire()
