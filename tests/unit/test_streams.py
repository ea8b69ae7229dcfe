from __future__ import annotations

import numpy as np
import pytest

from mukv.video.streams import COLOURS, RARE_SHAPES, make_stream, write_stream_benchmark


def test_streams_are_deterministic_by_seed():
    a, b, c = make_stream(40, seed=5), make_stream(40, seed=5), make_stream(40, seed=6)
    assert np.array_equal(a.frames, b.frames) and a.questions == b.questions
    assert not np.array_equal(a.frames, c.frames)


@pytest.mark.parametrize("frames", [2, 16, 256])
@pytest.mark.parametrize("seed", range(4))
def test_questions_have_unique_targets_and_correct_evidence(frames, seed):
    stream = make_stream(frames, seed=seed)
    kinds = {q.kind for q in stream.questions}
    assert kinds == ({"frame", "patch", "order"} if frames > 3 else kinds)
    for shape in RARE_SHAPES:
        large = [i for i, thing in enumerate(stream.main) if thing.shape == shape]
        small = [i for i, thing in enumerate(stream.small) if thing is not None and thing.shape == shape]
        assert len(large) + len(small) <= 1, f"{shape} appears more than once"
    for q in stream.questions:
        assert q.first_frame <= q.last_frame <= q.ask_frame < frames
        assert q.answer in COLOURS
        if q.kind == "frame":
            thing = stream.main[q.first_frame]
            assert q.question == f"What colour was the {thing.shape}?" and thing.colour == q.answer
        elif q.kind == "patch":
            thing = stream.small[q.first_frame]
            assert thing is not None and thing.colour == q.answer and thing.shape in q.question
        else:
            assert q.last_frame == q.first_frame + 1
            assert stream.main[q.first_frame].shape in q.question
            assert stream.main[q.last_frame].colour == q.answer


def test_order_answers_are_the_colour_finally_rendered_after_the_target():
    # Short streams with every kind: a ``frame`` target placed after an ``order`` target often
    # takes the slot right after it and recolours it; the answer must be what is shown there.
    for frames in range(3, 9):
        for seed in range(40):
            stream = make_stream(frames, seed=seed, kinds=("order", "frame", "patch"))
            for q in stream.questions:
                if q.kind == "order":
                    assert stream.main[q.last_frame].colour == q.answer, (frames, seed)


def test_rendered_colours_are_in_the_frames():
    stream = make_stream(12, seed=2)
    for q in stream.questions:
        frame = stream.frames[q.last_frame if q.kind == "order" else q.first_frame]
        assert (frame == np.array(COLOURS[q.answer], dtype=np.uint8)).all(axis=-1).sum() > 20


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        make_stream(1)
    with pytest.raises(ValueError, match="kinds"):
        make_stream(8, kinds=("frame", "nope"))


def test_benchmark_round_trip_through_mp4_and_the_rvs_loader(tmp_path):
    from mukv.eval.datasets import load_benchmark
    from mukv.video import open_video

    path = write_stream_benchmark(tmp_path, streams=2, num_frames=10, seed=1)
    videos = load_benchmark("rvs-ego", path)
    assert [v.video_id for v in videos] == ["stream_000", "stream_001"]
    original = make_stream(10, seed=10_000, fps=0.5)
    decoded = [f for batch in open_video(tmp_path / "videos" / "stream_000.mp4", sample_fps=0.5) for f in batch.frames]
    assert len(decoded) == 10
    for k, frame in enumerate(decoded):
        errors = [np.abs(frame.astype(int) - o.astype(int)).mean() for o in original.frames]
        assert int(np.argmin(errors)) == k
    for question in videos[1].questions:
        assert question.evidence is not None and question.evidence[0] <= question.time
