"""The disk tier (``ram_budget``, ``disk_dir``): payloads beyond the RAM budget move, oldest first,
to memory-mapped chunk files and read back bit for bit; files and directories come and go with
the blocks and the store."""

from __future__ import annotations

import fcntl
import gc
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mukv.kv.blocks import BlockPayload, BlockStore
from mukv.kv.disk import DiskTier, _host_tag


def payload(n: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> BlockPayload:
    """A block of ``n`` kept tokens: kv ``[2, 2, 2, n, 8]`` in ``dtype``, positions ``[1, n]``."""
    g = torch.Generator().manual_seed(seed)
    return BlockPayload(
        kv=torch.randn(2, 2, 2, n, 8, generator=g).to(dtype),
        positions=torch.arange(n).unsqueeze(0) + seed,
        kept=torch.randperm(2 * n, generator=g)[:n].sort().values,
        scores=torch.rand(2 * n, generator=g),
    )


def add(
    store: BlockStore,
    p: BlockPayload,
    frame: int,
    *,
    provisional: bool = False,
    granularity: str = "frame",
    end_time: float | None = None,
    representative: torch.Tensor | None = None,
) -> int:
    """Store ``p`` as the block of frame ``frame`` (ending at ``end_time``, default the frame's
    time); returns its id."""
    record = store.add(
        granularity=granularity,
        first_frame=frame,
        last_frame=frame,
        part=0,
        start_time=float(frame),
        end_time=float(frame) if end_time is None else end_time,
        payload=p,
        representative=torch.randn(4) if representative is None else representative,
        provisional=provisional,
    )
    return record.block_id


def ram_bytes(store: BlockStore) -> int:
    """Payload bytes of the blocks whose records say they are in RAM (counted from the records)."""
    return sum(store.payload(r.block_id).nbytes for r in store.records() if r.location != "disk")


def assert_identical(a: BlockPayload, b: BlockPayload) -> None:
    for name in ("kv", "positions", "kept", "scores"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


def test_ram_payload_bytes_stay_within_the_budget_after_every_add_oldest_moving_first():
    budget = 3 * payload(12, 0).nbytes
    store = BlockStore(ram_budget=budget)
    for i in range(12):
        add(store, payload(12, i), i)
        assert store.ram_nbytes == ram_bytes(store) <= budget
        assert store.ram_nbytes + store.disk_nbytes == sum(store.payload(r.block_id).nbytes for r in store.records())
    locations = [r.location for r in store.records()]
    # The oldest moved: every disk block comes before every RAM block.
    assert locations == ["disk"] * 9 + ["cpu"] * 3
    store.close()


def test_without_a_budget_nothing_moves():
    store = BlockStore()
    for i in range(4):
        add(store, payload(8, i), i)
    assert store.disk is None and store.disk_nbytes == 0
    assert {r.location for r in store.records()} == {"cpu"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_moved_payloads_are_bit_identical_and_read_through_the_mapping(dtype):
    originals = [payload(5 + i, i, dtype) for i in range(6)]
    store = BlockStore(ram_budget=1)
    for i, p in enumerate(originals):
        add(store, p, i)
    assert store.ram_nbytes == 0
    for i, p in enumerate(originals):
        assert store.record(i).location == "disk"
        stored = store.payload(i)
        assert_identical(p, stored)
        assert torch.equal(stored.dense(1), p.kv[1])
        assert stored.nbytes == p.nbytes
        # A view of the chunk file's mapping, not a copy in RAM.
        assert not stored.kv.untyped_storage().resizable()
    store.close()


def test_quantized_kv_moves_through_its_own_map_tensors():
    from mukv.kv.quant import QuantizedKV, quantize_kv

    dense = torch.randn(2, 2, 2, 16, 8).to(torch.bfloat16)
    p = BlockPayload(
        kv=quantize_kv(dense, 4, 8), positions=torch.arange(16)[None], kept=torch.arange(16), scores=torch.rand(16)
    )
    store = BlockStore(ram_budget=1)
    add(store, p, 0)
    stored = store.payload(0)
    assert isinstance(stored.kv, QuantizedKV) and store.record(0).location == "disk"
    for name, tensor in p.kv.tensors().items():
        assert torch.equal(stored.kv.tensors()[name], tensor), name
    assert torch.equal(stored.dense(), p.dense())
    assert store.disk_nbytes == p.nbytes
    store.close()


def test_provisional_blocks_never_move():
    store = BlockStore(ram_budget=1)
    provisional = [add(store, payload(6, i), i, provisional=True) for i in range(3)]
    stored = add(store, payload(6, 9), 3)
    assert [store.record(i).location for i in provisional] == ["cpu"] * 3
    assert store.record(stored).location == "disk"
    for i in provisional:
        store.remove(i)
    assert store.ram_nbytes == 0
    store.close()


def test_replacing_a_disk_payload_brings_it_back_to_ram_and_the_budget_applies_again():
    small = payload(2, 7)
    budget = 2 * payload(8, 0).nbytes + small.nbytes
    store = BlockStore(ram_budget=budget)
    for i in range(4):
        add(store, payload(8, i), i)
    assert [r.location for r in store.records()] == ["disk", "disk", "cpu", "cpu"]
    record = store.replace(0, small)
    assert record.location == "cpu" and record.tokens == 2
    assert store.ram_nbytes == ram_bytes(store) <= budget
    assert_identical(store.payload(0), small)
    # A larger payload no longer fits: the oldest RAM payload (this one) moves again.
    record = store.replace(0, payload(8, 8))
    assert record.location == "disk" and store.ram_nbytes == ram_bytes(store) <= budget
    assert store.ram_nbytes + store.disk_nbytes == sum(store.payload(r.block_id).nbytes for r in store.records())
    store.close()


def test_chunk_files_are_deleted_once_all_their_blocks_are_removed(tmp_path):
    p = payload(8, 0)
    # Two blocks a chunk (tensors are aligned to 64 bytes each).
    tier = DiskTier(tmp_path, chunk_bytes=2 * (p.nbytes + 4 * 64))
    store = BlockStore(ram_budget=1, disk=tier)
    for i in range(6):
        add(store, payload(8, i), i)
    files = sorted(tier.chunk_files())
    assert len(files) == 3 and all(f.is_file() for f in files)
    assert sorted(tier.directory.iterdir()) == files
    store.remove(0)
    assert files[0].is_file()  # block 1 still lives there
    store.remove(1)
    assert not files[0].exists() and files[1].is_file()
    store.remove(5)
    assert files[2].is_file()
    store.remove(4)
    assert not files[2].exists()
    assert sorted(tier.directory.iterdir()) == [files[1]]
    store.close()


def test_payloads_larger_than_a_chunk_get_a_chunk_of_their_own(tmp_path):
    big = payload(64, 1)
    tier = DiskTier(tmp_path, chunk_bytes=1024)
    store = BlockStore(ram_budget=1, disk=tier)
    add(store, big, 0)
    add(store, payload(2, 2), 1)
    assert len(tier.chunk_files()) == 2
    assert_identical(store.payload(0), big)
    store.close()


def test_temporary_directory_goes_when_the_store_is_closed():
    store = BlockStore(ram_budget=1)
    add(store, payload(8, 0), 0)
    directory = store.disk.directory
    assert directory.is_dir() and any(directory.iterdir())
    kept = store.payload(0)
    store.close()
    assert not directory.exists()
    # Payloads already read stay readable (the kernel keeps an unlinked file's mapped pages).
    assert kept.kv.float().abs().sum() > 0


def test_temporary_directory_goes_when_the_store_is_garbage_collected():
    store = BlockStore(ram_budget=1)
    add(store, payload(8, 0), 0)
    directory = store.disk.directory
    assert directory.is_dir()
    del store
    gc.collect()
    assert not directory.exists()


def test_disk_dir_gets_a_directory_of_its_own_and_keeps_what_it_held(tmp_path):
    disk_dir = tmp_path / "made" / "here"
    tier = DiskTier(disk_dir)
    assert disk_dir.is_dir() and tier.directory.parent == disk_dir
    (disk_dir / "someone-elses.txt").write_text("keep")
    store = BlockStore(ram_budget=1, disk=tier)
    add(store, payload(8, 0), 0)
    assert tier.chunk_files()[0].parent == tier.directory
    store.close()
    assert not tier.directory.exists()
    assert disk_dir.is_dir() and (disk_dir / "someone-elses.txt").read_text() == "keep"


def test_an_unusable_disk_dir_is_a_clear_error_naming_the_field(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"disk_dir: cannot create or write .*a-file/tier"):
        DiskTier(blocker / "tier")


def test_memory_config_with_an_unusable_disk_dir_fails_at_creation(backend, tmp_path):
    from mukv import StreamSession

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="disk_dir"):
        StreamSession(backend, "rekv", overrides={"ram_budget": "1KB", "disk_dir": str(blocker / "x")})


def test_a_failed_write_leaves_the_block_in_ram_and_nothing_readable(tmp_path, monkeypatch):
    import os

    store = BlockStore(ram_budget=1, disk=DiskTier(tmp_path))
    calls = {"n": 0}
    real = os.pwrite

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(OSError, match="disk tier: cannot write"):
        add(store, payload(8, 0), 0)
    assert store.record(0).location == "cpu" and store.disk_nbytes == 0 and len(store.disk) == 0
    monkeypatch.setattr(os, "pwrite", real)
    original = payload(8, 1)
    add(store, original, 1)  # the next add moves both
    assert [r.location for r in store.records()] == ["disk", "disk"]
    assert_identical(store.payload(1), original)
    assert_identical(store.payload(0), payload(8, 0))
    store.close()


def test_stats_report_disk_bytes_within_total_bytes(backend):
    from mukv import StreamSession
    from tests.conftest import make_frames

    frames = make_frames(4, seed=1)
    session = StreamSession(backend, "rekv", overrides={"ram_budget": 1, "block_frames": 1}, fps=1.0)
    session.ingest(frames, [0.0, 1.0, 2.0, 3.0])
    stats = session.stats()
    stored = sum(session.memory.store.payload(r.block_id).nbytes for r in session.memory.store.records())
    assert stats.disk_bytes == stored > 0
    assert stats.to_dict()["disk_bytes"] == stats.disk_bytes
    assert stats.total_bytes > stats.disk_bytes
    session.memory.close()


def test_files_are_named_and_sized_as_documented(tmp_path: Path):
    tier = DiskTier(tmp_path, chunk_bytes=4096)
    mapped = tier.write(3, payload(4, 0))
    (chunk,) = tier.chunk_files()
    assert chunk.name == "chunk-000000.bin" and chunk.stat().st_size == 4096
    assert 3 in tier and tier.nbytes == mapped.nbytes
    tier.release(3)
    assert not chunk.exists() and tier.nbytes == 0
    tier.close()


# A process that spills a block to a private tier, says where, then waits to be killed.
SPILL_AND_WAIT = """
import sys, time
from mukv.kv.blocks import BlockStore
from tests.unit.test_disk_tier import add, payload
store = BlockStore(ram_budget=1)
add(store, payload(8, 0), 0)
print(store.disk.directory, flush=True)
time.sleep(120)
"""


def killed_with_its_tier(root: Path) -> tuple[int, Path]:
    """Run a process that spills to a private tier in ``root``, kill it with SIGKILL: its pid (dead,
    reaped) and the directory it left behind."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TMPDIR": str(root), "PYTHONPATH": str(repo)}
    process = subprocess.Popen([sys.executable, "-c", SPILL_AND_WAIT], cwd=repo, env=env, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        directory = Path(process.stdout.readline().decode().strip())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(60)
    assert process.returncode == -signal.SIGKILL
    return process.pid, directory


def test_a_killed_process_directory_is_removed_by_the_next_private_tier(tmp_path, monkeypatch):
    root = tmp_path / "tmp"
    root.mkdir()
    pid, left = killed_with_its_tier(root)
    host = _host_tag()
    assert left.parent == root and left.name.startswith(f"mukv-disk-{host}-{pid}-")
    assert [f.name for f in left.iterdir()] == ["chunk-000000.bin"]  # nothing removed it
    # Kept: a live process's (this one's), a dead one's holding anything but chunk files, one whose
    # owner holds its lock (a process this one cannot see), another host's (its pids mean nothing
    # here), names not of that form (a disk_dir tier's, a pid without a host).
    live = root / f"mukv-disk-{host}-{os.getpid()}-abcd1234"
    foreign = root / f"mukv-disk-{host}-{pid}-abcd1234"
    nested = root / f"mukv-disk-{host}-{pid}-nested00"
    locked = root / f"mukv-disk-{host}-{pid}-locked00"
    elsewhere = root / f"mukv-disk-{'0' * 8 if host != '0' * 8 else '1' * 8}-{pid}-abcd1234"
    others = [
        elsewhere,
        root / "mukv-disk-abcd1234",
        root / f"mukv-disk-{pid}-abcd1234",
        root / f"mukv-disk-{host}-{pid}-x.y",
        root / f"mukv-disk-{host}-{pid}",
    ]
    for directory in [live, foreign, nested, locked, *others]:
        directory.mkdir()
        (directory / "chunk-000000.bin").write_bytes(b"\0" * 64)
    (foreign / "notes.txt").write_text("keep")
    (nested / "chunk-000001.bin").mkdir()
    (root / f"mukv-disk-{host}-{pid}-symlink0").symlink_to(live)
    holder = os.open(locked, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_SH)
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    try:
        tier = DiskTier()
    finally:
        os.close(holder)
    assert tier.directory.parent == root and tier.directory.name.startswith(f"mukv-disk-{host}-{os.getpid()}-")
    assert not left.exists()
    for directory in [live, foreign, nested, locked, *others]:
        assert (directory / "chunk-000000.bin").exists(), directory
    assert (foreign / "notes.txt").read_text() == "keep" and (nested / "chunk-000001.bin").is_dir()
    assert (root / f"mukv-disk-{host}-{pid}-symlink0").is_symlink()
    # Once its owner let go, a locked directory goes with the next tier; this tier's own stays.
    second = DiskTier()
    assert not locked.exists() and tier.directory.is_dir() and live.is_dir()
    second.close()
    tier.close()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        p.name for p in [live, foreign, nested, *others, root / f"mukv-disk-{host}-{pid}-symlink0"]
    )


def test_a_disk_dir_is_never_swept(tmp_path, monkeypatch):
    (tmp_path / "private").mkdir()
    pid, left = killed_with_its_tier(tmp_path / "private")  # for a dead pid
    disk_dir = tmp_path / "mine"
    disk_dir.mkdir()
    dead = disk_dir / f"mukv-disk-{_host_tag()}-{pid}-abcd1234"
    dead.mkdir()
    (dead / "chunk-000000.bin").write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "private"))
    tier = DiskTier(disk_dir)  # a tier in disk_dir sweeps nothing, there or in the temporary root
    assert dead.is_dir() and left.is_dir()
    assert "-" not in tier.directory.name.removeprefix("mukv-disk-")  # not a private tier's name
    tier.close()
    DiskTier().close()  # a private tier sweeps only the temporary root
    assert dead.is_dir() and not left.exists()
