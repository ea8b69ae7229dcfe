"""Saving a stream's memory and loading it back (``StreamSession.save`` / ``StreamSession.load``).

A loaded memory must be the saved one exactly: the same answer tokens and first-token logits, and
ingesting more frames afterwards must give the state (blocks, open groups, windows, clock) that
never saving gives. Streams are saved mid-group (an open segment, ReKV's open block and a sliding
window that has evicted, Qwen-VL's incomplete temporal group) on the tiny checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mukv import StreamSession
from mukv.errors import MemoryFileError, MemoryMismatchError
from mukv.memory import method_config
from mukv.memory.persist import FORMAT_VERSION, MANIFEST, read_manifest
from tests.conftest import make_frames
from tests.integration.qwen_helpers import load_tiny

QUESTION = "What colour was the triangle?"
FPS = 0.5
MUKV = {"top_k.patch": 3, "top_k.frame": 2, "top_k.segment": 1, "segment_frames": 4}
REKV = {"retrieve_blocks": 2, "block_frames": 2}


def feed(session: StreamSession, frames: np.ndarray, start: int, stop: int, chunk: int = 3) -> None:
    """Ingest frames ``start..stop-1`` (frame ``i`` at ``i / FPS`` s) in chunks of ``chunk``."""
    for a in range(start, stop, chunk):
        b = min(a + chunk, stop)
        session.ingest(frames[a:b], np.arange(a, b, dtype=float) / FPS)


def assert_same_answer(saved: StreamSession, loaded: StreamSession) -> None:
    a = saved.ask(QUESTION, max_new_tokens=4, output_logits=True)
    b = loaded.ask(QUESTION, max_new_tokens=4, output_logits=True)
    assert a.token_ids == b.token_ids
    assert torch.equal(a.first_logits, b.first_logits)
    assert a.retrieved == b.retrieved
    assert (a.frames_seen, a.time, a.context_tokens) == (b.frames_seen, b.time, b.context_tokens)


def assert_same_state(one: StreamSession, two: StreamSession) -> None:
    """Stored blocks (records, payloads, representatives), clock, open state and pending frames equal."""
    m1, m2 = one.memory, two.memory
    assert m1._timestamps == m2._timestamps and m1._stamps == m2._stamps
    r1, r2 = m1.saved_blocks(), m2.saved_blocks()
    assert r1 == r2 and len(r1) > 0
    for record in r1:
        p1, p2 = m1.store.payload(record.block_id), m2.store.payload(record.block_id)
        for name in ("kv", "positions", "kept", "scores"):
            assert torch.equal(getattr(p1, name), getattr(p2, name)), name
        assert torch.equal(m1.store.representative(record.block_id), m2.store.representative(record.block_id))
    t1, meta1 = m1.export_state()
    t2, meta2 = m2.export_state()
    assert meta1 == meta2
    assert t1.keys() == t2.keys()
    for name in t1:
        assert torch.equal(t1[name], t2[name]), name
    assert one.frames_seen == two.frames_seen and one.time == two.time
    assert one._pending_times == two._pending_times
    assert (one._pending is None) == (two._pending is None)
    if one._pending is not None:
        assert torch.equal(one._pending, two._pending)


def round_trip(backend, method: str, overrides: dict, tmp_path: Path, first: int, total: int, **kw) -> None:
    """Ingest ``first`` frames, save, load; answers equal; ingest up to ``total`` in both; states and
    answers equal again, and equal to a session that never saved."""
    frames = make_frames(total, seed=3)
    saved = StreamSession(backend, method, overrides=overrides, fps=FPS)
    feed(saved, frames, 0, first, **kw)
    saved.save(tmp_path / "mem")
    loaded = StreamSession.load(backend, tmp_path / "mem")
    assert_same_state(saved, loaded)
    assert_same_answer(saved, loaded)
    never = StreamSession(backend, method, overrides=overrides, fps=FPS)
    feed(never, frames, 0, first, **kw)
    # Asked like the others: a question's provisional blocks take ids (a stored block's id is kept).
    never.ask(QUESTION, max_new_tokens=4)
    for session in (saved, loaded, never):
        feed(session, frames, first, total, **kw)
    assert_same_state(never, loaded)
    assert_same_answer(never, loaded)


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("mukv", MUKV),
        ("mukv", {**MUKV, "encode": "shared"}),
        # A window of two frames' tokens: frames have been evicted and re-positioned when saved.
        ("rekv", {**REKV, "n_local": 32}),
    ],
    ids=["mukv", "mukv-shared", "rekv-evicting"],
)
def test_llava_memory_saved_mid_group_answers_and_continues_exactly(backend, tmp_path, method, overrides):
    # 7 frames: segment 4-6 open (MuKV), frame 6 in ReKV's open block.
    round_trip(backend, method, overrides, tmp_path, first=7, total=11)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen(request, tmp_path_factory):
    from mukv.backends.tiny_qwen import build_tiny_qwen

    # Frames the families' own tests use: 2 x 3 merged patches per unit.
    shape = {"qwen2_5_vl": (56, 84), "qwen3_vl": (64, 96)}[request.param]
    return load_tiny(build_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param), shape)


@pytest.mark.parametrize(("method", "overrides"), [("mukv", MUKV), ("rekv", {**REKV, "n_local": 12})])
def test_qwen_memory_saved_with_an_incomplete_group_answers_and_continues_exactly(qwen, tmp_path, method, overrides):
    # 7 frames: three units of two frames stored, frame 6 waiting for its pair in the session (the
    # answer pads it); Qwen2.5-VL places units by the stream's rate, Qwen3-VL writes a stamp per unit.
    round_trip(qwen, method, overrides, tmp_path, first=7, total=12, chunk=3)


def test_saving_again_writes_only_new_blocks_and_forks_never_mix(backend, tmp_path):
    frames = make_frames(12, seed=4)
    path = tmp_path / "mem"
    session = StreamSession(backend, "mukv", overrides=MUKV, fps=FPS)
    feed(session, frames, 0, 6)
    session.save(path)
    first = read_manifest(path)
    old_chunks = {c["file"] for c in first["chunks"]}
    stamps = {name: (path / name).stat().st_mtime_ns for name in old_chunks}
    feed(session, frames, 6, 9)
    session.save(path)
    second = read_manifest(path)
    # The earlier chunk is kept as written; the new blocks are in a new chunk; old state is gone.
    assert old_chunks < {c["file"] for c in second["chunks"]}
    assert all((path / name).stat().st_mtime_ns == stamps[name] for name in old_chunks)
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, *second["files"]])
    assert_same_state(session, StreamSession.load(backend, path))
    # Two sessions loaded from one save go on differently; each save holds its own stream only.
    fork_a, fork_b = StreamSession.load(backend, path), StreamSession.load(backend, path)
    feed(fork_a, frames, 9, 12)
    other = make_frames(12, seed=5)
    feed(fork_b, other, 9, 11)
    fork_a.save(path)
    fork_b.save(path)
    assert_same_state(fork_b, StreamSession.load(backend, path))


@pytest.fixture(scope="module")
def saved(backend, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "mem"
    session = StreamSession(backend, "mukv", overrides=MUKV, fps=FPS)
    feed(session, make_frames(6, seed=6), 0, 6)
    session.save(path, extra={"note": "kept"})
    assert read_manifest(path)["extra"] == {"note": "kept"}
    return path


def copy_of(saved: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "copy"))


def test_loading_into_another_model_names_the_difference(saved, tmp_path):
    from mukv.backends import load_backend
    from mukv.backends.tiny import build_tiny_model

    other = load_backend(build_tiny_model(tmp_path / "other", seed=1))
    with pytest.raises(MemoryMismatchError, match=r"another model .*weights_sha256"):
        StreamSession.load(other, saved)


def test_a_checkpoint_with_one_other_tensor_is_another_model(saved, tiny_model_dir, tmp_path):
    # A fine-tune or a merged adapter touches some matrices only: one scaled attention matrix deep
    # in the model must be caught, wherever it is.
    import shutil

    from safetensors.torch import load_file, save_file

    from mukv.backends import load_backend

    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "tuned"))
    weights = load_file(other / "model.safetensors")
    name = next(k for k in sorted(weights) if "layers.1." in k and "k_proj.weight" in k)
    weights[name] = weights[name] * 1.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MemoryMismatchError, match="weights_sha256"):
        StreamSession.load(load_backend(other), saved)


def test_loading_with_another_config_method_or_rate_names_it(backend, saved):
    with pytest.raises(MemoryMismatchError, match=r"top_k\.frame: saved 2, now 5"):
        StreamSession.load(backend, saved, method_config=method_config("mukv", {**MUKV, "top_k.frame": 5}))
    with pytest.raises(MemoryMismatchError, match="method 'mukv', not 'rekv'"):
        StreamSession.load(backend, saved, method="rekv")
    with pytest.raises(MemoryMismatchError, match=r"sampled at 0\.5 frames per second, not 1"):
        StreamSession.load(backend, saved, fps=1.0)
    # The saved config, given explicitly, loads.
    StreamSession.load(backend, saved, method="mukv", method_config=method_config("mukv", MUKV), fps=FPS)


def test_a_newer_format_version_is_refused(backend, saved, tmp_path):
    path = copy_of(saved, tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match=f"format version {FORMAT_VERSION + 1}.*upgrade mukv"):
        StreamSession.load(backend, path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_memories_are_refused_with_the_file_named(backend, saved, tmp_path, damage):
    path = copy_of(saved, tmp_path)
    manifest = read_manifest(path)
    chunk = path / manifest["chunks"][0]["file"]
    state = path / manifest["state"]["file"]
    if damage == "flip":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x01
        chunk.write_bytes(bytes(data))
        expected = f"{chunk.name}: damaged"
    elif damage == "truncate":
        with state.open("r+b") as handle:
            handle.truncate(state.stat().st_size - 10)
        expected = f"{state.name}: truncated"
    elif damage == "delete":
        os.remove(chunk)
        expected = f"{chunk.name} is missing"
    else:
        (path / MANIFEST).write_text((path / MANIFEST).read_text()[:100])
        expected = "manifest.json: damaged or truncated"
    with pytest.raises(MemoryFileError, match=expected):
        StreamSession.load(backend, path)


def test_a_block_file_contradicting_its_metadata_is_a_clear_error(backend, saved, tmp_path):
    # Checksums recomputed after an edit pass the checks: the shapes must still be refused clearly.
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = copy_of(saved, tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    name = manifest["chunks"][0]["file"]
    with safe_open(str(path / name), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    entries = json.loads(metadata["blocks"])
    entries[0]["shapes"]["representatives"] = [3]
    save_file(tensors, path / name, metadata={**metadata, "blocks": json.dumps(entries)})
    data = (path / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match=r"copy: damaged (block file|saved state)"):
        StreamSession.load(backend, path)


def test_what_cannot_be_saved_or_overwritten_is_refused(backend, tmp_path):
    frames = make_frames(2, seed=7)
    full = StreamSession(backend, "full", fps=FPS)
    feed(full, frames, 0, 2)
    with pytest.raises(MemoryFileError, match="method 'full' cannot be saved"):
        full.save(tmp_path / "full")
    assert not (tmp_path / "full").exists()
    session = StreamSession(backend, "rekv", fps=FPS)
    feed(session, frames, 0, 2)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(MemoryFileError, match="not a saved memory; refusing to overwrite"):
        session.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(MemoryFileError, match=r"manifest.json is missing"):
        StreamSession.load(backend, tmp_path / "notes")
    # A directory that only holds a file named like a manifest, or a memory of a newer format, is
    # not a memory this version may replace.
    (tmp_path / "project" / "src").mkdir(parents=True)
    (tmp_path / "project" / MANIFEST).write_text('{"name": "app"}')
    (tmp_path / "project" / "src" / "app.py").write_text("keep me")
    with pytest.raises(MemoryFileError, match="refusing to overwrite"):
        session.save(tmp_path / "project")
    assert (tmp_path / "project" / "src" / "app.py").read_text() == "keep me"
    session.save(tmp_path / "newer")
    manifest = json.loads((tmp_path / "newer" / MANIFEST).read_text())
    (tmp_path / "newer" / MANIFEST).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(MemoryFileError, match=r"upgrade mukv.*refusing to overwrite"):
        session.save(tmp_path / "newer")
    assert json.loads((tmp_path / "newer" / MANIFEST).read_text())["format_version"] == FORMAT_VERSION + 1


def siblings(path: Path) -> list[str]:
    """Temporary and aside directories a save leaves next to memory ``path`` when it is cut short."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.") and p.is_dir())


def test_a_save_cut_after_moving_the_memory_aside_is_recovered(backend, tmp_path):
    # A crash between moving the old directory aside and renaming the new one into place leaves no
    # memory at the path: the aside copy (and a half-written temporary directory) are all there is.
    frames = make_frames(9, seed=8)
    path = tmp_path / "mem"
    session = StreamSession(backend, "mukv", overrides=MUKV, fps=FPS)
    feed(session, frames, 0, 6)
    session.save(path)
    os.replace(path, tmp_path / ".mem.0123abcd.old")
    (tmp_path / ".mem.k2j4h5g6.tmp").mkdir()
    (tmp_path / ".mem.k2j4h5g6.tmp" / "blocks-0123abcd-0.safetensors").write_bytes(b"half")
    # A memory named like a sibling of another one is not touched.
    (tmp_path / ".mem.x.abcdef12.tmp").mkdir()
    assert read_manifest(path)["save_id"] == session._saved_as[path.resolve()]
    assert siblings(path) == [".mem.x.abcdef12.tmp"]
    assert_same_state(session, StreamSession.load(backend, path))
    # Loading recovers too, and the session's next save is still incremental (the same save).
    os.replace(path, tmp_path / ".mem.4567cdef.old")
    assert_same_state(session, StreamSession.load(backend, path))
    first_chunks = {c["file"] for c in read_manifest(path)["chunks"]}
    os.replace(path, tmp_path / ".mem.89abcdef.old")
    feed(session, frames, 6, 9)
    session.save(path)
    assert first_chunks < {c["file"] for c in read_manifest(path)["chunks"]}
    assert siblings(path) == [".mem.x.abcdef12.tmp"]
    assert_same_state(session, StreamSession.load(backend, path))


def test_a_full_save_cut_before_its_manifest_leaves_the_previous_save(backend, tmp_path, monkeypatch):
    from mukv.memory import persist

    path = tmp_path / "mem"
    one = StreamSession(backend, "mukv", overrides=MUKV, fps=FPS)
    feed(one, make_frames(6, seed=9), 0, 6)
    one.save(path)
    two = StreamSession(backend, "mukv", overrides=MUKV, fps=FPS)
    feed(two, make_frames(6, seed=10), 0, 6)

    def crash(target: Path, data: dict) -> None:
        raise KeyboardInterrupt  # the process dies before the new manifest is committed

    monkeypatch.setattr(persist, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        two.save(path)
    monkeypatch.undo()
    assert_same_state(one, StreamSession.load(backend, path))
    # The next save removes what the cut one wrote.
    two.save(path)
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, *read_manifest(path)["files"]])
    assert_same_state(two, StreamSession.load(backend, path))


def test_concurrent_saves_into_one_directory_leave_one_of_them_whole(backend, tmp_path):
    import threading

    path = tmp_path / "mem"
    base = StreamSession(backend, "mukv", overrides=MUKV, fps=FPS)
    feed(base, make_frames(6, seed=11), 0, 6)
    base.save(path)
    for round_ in range(4):
        # Two streams loaded from one save: each would save incrementally into the same directory.
        forks = [StreamSession.load(backend, path) for _ in range(2)]
        seen = forks[0].frames_seen
        for i, fork in enumerate(forks):
            feed(fork, make_frames(seen + 4, seed=20 + 2 * round_ + i), seen, seen + 3 + i)
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def save(session: StreamSession, start: threading.Barrier = start, errors: list = errors) -> None:
            start.wait()
            try:
                session.save(path)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(fork,)) for fork in forks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        save_id = read_manifest(path)["save_id"]
        winner = next(f for f in forks if f._saved_as[path.resolve()] == save_id)
        loaded = StreamSession.load(backend, path)
        assert_same_state(winner, loaded)
        assert_same_answer(winner, loaded)
        assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, *read_manifest(path)["files"]])


def test_files_of_others_in_a_memory_directory_survive_saves(backend, tmp_path):
    frames = make_frames(9, seed=12)
    path = tmp_path / "mem"
    session = StreamSession(backend, "rekv", overrides=REKV, fps=FPS)
    feed(session, frames, 0, 4)
    session.save(path)
    (path / "notes.txt").write_text("keep me")
    (path / "blocks-by-hand.json").write_text("keep me too")
    feed(session, frames, 4, 6)
    session.save(path)  # incremental
    other = StreamSession(backend, "rekv", overrides=REKV, fps=FPS)
    feed(other, frames, 0, 9)
    other.save(path)  # the whole memory replaced
    assert (path / "notes.txt").read_text() == "keep me"
    assert (path / "blocks-by-hand.json").read_text() == "keep me too"
    files = read_manifest(path)["files"]
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, "notes.txt", "blocks-by-hand.json", *files])
    assert_same_state(other, StreamSession.load(backend, path))


def test_ingest_goes_on_while_a_save_writes(backend, tmp_path, monkeypatch):
    import threading

    from mukv.memory import persist

    frames = make_frames(9, seed=13)
    path = tmp_path / "mem"
    session = StreamSession(backend, "mukv", overrides=MUKV, fps=FPS)
    feed(session, frames, 0, 6)
    writing, ingested = threading.Event(), threading.Event()
    write_chunk = persist._write_chunk

    def observed_write_chunk(*args, **kwargs):
        writing.set()
        # Hold the write open until the other thread's ingest is done (or clearly blocked).
        ingested.wait(timeout=20)
        return write_chunk(*args, **kwargs)

    monkeypatch.setattr(persist, "_write_chunk", observed_write_chunk)
    saver = threading.Thread(target=session.save, args=(path,))
    saver.start()
    assert writing.wait(timeout=60)
    ingester = threading.Thread(target=lambda: (feed(session, frames, 6, 9), ingested.set()))
    ingester.start()
    ingester.join(timeout=10)
    finished_while_writing = ingested.is_set() and saver.is_alive()
    ingested.set()
    saver.join()
    ingester.join()
    assert finished_while_writing
    # The save holds the stream as it was when the save began, not the frames ingested meanwhile.
    before = StreamSession(backend, "mukv", overrides=MUKV, fps=FPS)
    feed(before, frames, 0, 6)
    assert_same_state(before, StreamSession.load(backend, path))


def test_deleting_a_memory_removes_its_leftovers_and_lock_but_nothing_else(backend, tmp_path):
    from mukv.memory.persist import delete_memory

    session = StreamSession(backend, "mukv", overrides=MUKV, fps=FPS)
    feed(session, make_frames(5, seed=2), 0, 5)
    path = tmp_path / "mem"
    session.save(path)
    (tmp_path / ".mem.0123abcd.old").mkdir()  # a cut save's leftovers
    (tmp_path / ".mem.x.abcdef12.tmp").mkdir()  # memory "mem.x"'s, not this one's
    (tmp_path / "other").write_text("kept")
    assert (tmp_path / ".mem.lock").exists()
    assert delete_memory(path) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mem.x.abcdef12.tmp", "other"]
    assert delete_memory(path) is False
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(MemoryFileError, match="is a link"):
        delete_memory(tmp_path / "link")
    assert target.is_dir()


def test_a_memory_loads_under_another_budget_or_ram_budget_but_not_another_storage_form(backend, tmp_path):
    session = StreamSession(backend, "mukv", overrides=MUKV, fps=FPS)
    feed(session, make_frames(12, seed=4), 0, 12)
    session.save(tmp_path / "mem")
    stored = session.memory.stored_bytes()
    kept = {"memory_budget": stored // 2, "ram_budget": 4096, "disk_dir": str(tmp_path / "tier")}
    loaded = StreamSession.load(backend, tmp_path / "mem", method_config=method_config("mukv", {**MUKV, **kept}))
    config = loaded.memory.config
    assert (config.memory_budget, config.ram_budget, config.disk_dir) == tuple(kept.values())
    assert loaded.memory.stored_bytes() <= stored // 2 < stored  # consolidated at once
    assert loaded.memory.stats().disk_bytes > 0  # and spilled beyond the RAM budget
    assert loaded.ask(QUESTION, max_new_tokens=2).text is not None
    loaded.memory.close()
    with pytest.raises(MemoryMismatchError, match="kv_dtype"):
        StreamSession.load(backend, tmp_path / "mem", method_config=method_config("mukv", {**MUKV, "kv_dtype": "int8"}))
