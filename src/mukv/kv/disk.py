"""The disk tier: stored block payloads in memory-mapped files (``ram_budget``, ``disk_dir``).

A :class:`DiskTier` writes a payload's tensors into append-only **chunk files** (about
:data:`CHUNK_BYTES` each; a payload larger than that gets a chunk of its own) and hands back the
same payload whose tensors are read-only views of the file's mapping: readers go on calling
:meth:`mukv.kv.blocks.BlockPayload.dense` as before, and the kernel's page cache decides what
stays in RAM. Nothing here is durable: the files hold one process's working set, they are not a
saved memory (``StreamSession.save`` writes one, reading the payloads through the mapping).

Files live in a directory of their own: a fresh ``mukv-disk-*`` directory inside ``disk_dir``
when one is given (created if missing), else a private temporary directory
``mukv-disk-<host>-<pid>-*`` in the temporary root (:func:`tempfile.gettempdir`: ``TMPDIR``), named
after the creating host (8 hex digits of the SHA-1 of its name) and process. Only that directory
and the chunk files in it are ever removed: when the tier is closed or garbage-collected, or at
interpreter exit.

**Directories left behind.** A process killed before it exits normally (``SIGKILL``, an unhandled
``SIGTERM``) leaves its directory behind. Each new private tier sweeps the temporary root for
``mukv-disk-<host>-<pid>-*`` directories of this host's processes that no longer run and removes
them, only if all of these hold: the name has exactly that form, with this host's tag (a root
shared between hosts is swept of each host's own only: a pid means nothing on another host); the
directory is this user's and not a symbolic
link; ``<pid>`` is not a running process (``os.kill(pid, 0)`` finds none; a process of another
user counts as running); no process holds the shared lock every private tier keeps on its
directory while open (``flock``: it covers processes whose pids this one cannot see, in another
PID namespace sharing the temporary root); and the directory holds nothing but chunk files
(``chunk-<number>.bin``, plain files). Anything else inside, or any doubt, leaves it as it is. A
recycled pid makes a dead owner look alive: its directory is then not swept (yet). A
``disk_dir`` is never swept: its tiers' directories are named ``mukv-disk-*`` without a pid, and
a directory left in it stays until removed by hand.

**Writing.** A block's tensors are written with ``pwrite`` at the chunk's end (each at an offset
aligned to :data:`ALIGN` bytes) and only then are views made over the written bytes, so a block
that failed half-way is never readable (its space is simply not used again). The file is sized
to its capacity up front (sparse: disk space is taken as bytes are written) so that a single
read-only mapping per chunk covers every block appended later; writes through the page cache are
visible in that shared mapping at once.

**Removing.** :meth:`DiskTier.release` forgets a block; a chunk whose blocks have all been
released is deleted (its mapping lives on while a view of it is still referenced, e.g. by a save
in progress, then goes). The space of a released block in a chunk that still holds live blocks
is neither reused nor returned to the filesystem until the whole chunk is released: with blocks
evicted or re-pruned out of order (a ``memory_budget``), the files can hold up to a chunk's worth
of dead bytes per chunk still in use; :attr:`DiskTier.nbytes` counts live payload bytes only.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import mmap
import os
import re
import shutil
import socket
import tempfile
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mukv.kv.blocks import BlockPayload

__all__ = ["ALIGN", "CHUNK_BYTES", "DiskTier"]

logger = logging.getLogger(__name__)

#: Bytes of a chunk file (a payload larger than this gets a chunk of its own size).
CHUNK_BYTES = 64 << 20
#: Every tensor starts at a multiple of this many bytes (any dtype's size; a cache line).
ALIGN = 64


#: A private tier's directory: ``mukv-disk-<host>-<pid of its process>-<mkdtemp's random characters>``,
#: ``<host>`` the first 8 hex digits of the SHA-1 of the host name (:func:`_host_tag`).
_PRIVATE_DIR = re.compile(r"mukv-disk-([0-9a-f]{8})-([1-9][0-9]{0,9})-[a-z0-9_]+")
#: A chunk file (:meth:`DiskTier._chunk_for`): the only thing a swept directory may hold.
_CHUNK_FILE = re.compile(r"chunk-[0-9]{6,}\.bin")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _host_tag() -> str:
    """This host's tag in private directory names: a pid means something only on the host that
    gave it, and a temporary root may be shared between hosts (a network scratch directory, where
    ``flock`` may not reach across hosts either), so only this host's directories are swept."""
    return hashlib.sha1(socket.gethostname().encode(), usedforsecurity=False).hexdigest()[:8]


def _running(pid: int) -> bool:
    """Whether process ``pid`` may be running (only a definite "no such process" says no)."""
    try:
        os.kill(pid, 0)  # signal 0: the existence and permission checks only, nothing is sent
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: another user's process; anything else: in doubt
        return True
    return True


def _lock_shared(directory: Path) -> int | None:
    """Hold a shared ``flock`` on ``directory`` (returns the descriptor, to close at cleanup): it tells
    sweepers that the owner runs even where they cannot see its pid. ``None`` where the filesystem
    takes no lock (a sweeper's exclusive lock fails there too, so nothing is swept from it)."""
    import fcntl

    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        # Blocking: a sweeper (that cannot see this pid) may hold it for the moment it takes to look.
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_abandoned(directory: Path) -> bool:
    """Remove ``directory`` (a dead process's private tier) if no process holds its lock and it holds
    only chunk files; returns whether it was removed."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner (or another sweeper) holds it
            return False
        entries = list(os.scandir(fd))
        if not all(_CHUNK_FILE.fullmatch(e.name) and e.is_file(follow_symlinks=False) for e in entries):
            return False
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.name, dir_fd=fd)
        # rmdir, not rmtree: whatever appeared since the listing stays, and so does the directory.
        os.rmdir(directory)
    finally:
        os.close(fd)
    return True


def _sweep_abandoned(root: Path) -> list[Path]:
    """Remove the private tier directories in ``root`` left by processes that no longer run (see
    the module docstring for what must hold); returns the directories removed. Never raises: a
    sweep that fails leaves things as they were."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process elsewhere (Windows)
        return []
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    host = _host_tag()
    for entry in entries:
        match = _PRIVATE_DIR.fullmatch(entry.name)
        if match is None or match.group(1) != host or _running(int(match.group(2))):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            if _remove_abandoned(Path(entry.path)):
                removed.append(Path(entry.path))
                logger.info("disk tier: removed %s, left behind by process %s", entry.path, match.group(2))
        except OSError as exc:
            logger.debug("disk tier: leaving %s (%s)", entry.path, exc)
    return removed


def _private_directory(root: Path) -> tuple[Path, int | None]:
    """A new private tier directory in ``root``, named after this host and process so that a later
    tier can tell a dead process's directory, and the descriptor holding its shared lock."""
    prefix = f"mukv-disk-{_host_tag()}-{os.getpid()}-"
    for _ in range(3):
        own = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        if os.name != "posix":
            return own, None
        lock = _lock_shared(own)
        # A sweeper that cannot see this pid (another PID namespace) may have taken the directory,
        # still empty, before the lock was held: then make another.
        try:
            if lock is None or os.stat(own).st_ino == os.fstat(lock).st_ino:
                return own, lock
        except OSError:
            pass
        if lock is not None:
            os.close(lock)
    raise OSError(f"disk tier: private directories in {root} keep disappearing")


@dataclass
class _Chunk:
    path: Path
    capacity: int
    fd: int | None
    # Read-only shared mapping of the whole file (uint8 ``[capacity]``); views keep it alive.
    mapping: np.memmap
    used: int = 0
    live: set[int] = field(default_factory=set)


class _Files:
    """The tier's directory and open descriptors, apart from the tier so that its finalizer holds
    no reference to the tier itself."""

    def __init__(self, directory: Path, lock: int | None = None) -> None:
        self.directory = directory
        self.fds: set[int] = set()
        self.lock = lock  # a descriptor of the directory holding its shared lock (private tiers)

    def cleanup(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.lock is not None:
            with contextlib.suppress(OSError):
                os.close(self.lock)
            self.lock = None


class DiskTier:
    """Payloads in memory-mapped chunk files (see the module docstring), by key (a block id).

    ``directory``: where this tier's own directory is made (``disk_dir``); ``None`` for a private
    temporary directory ``mukv-disk-<host>-<pid>-*``, whose creation also removes the private directories
    that processes killed before they could clean up left in the same temporary root (see
    "Directories left behind" in the module docstring). ``ValueError`` naming ``disk_dir`` when it
    cannot be created or written.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes < ALIGN:
            raise ValueError(f"chunk_bytes: must be at least {ALIGN}, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        lock: int | None = None
        if directory is None:
            root = Path(tempfile.gettempdir())
            own, lock = _private_directory(root)
            _sweep_abandoned(root)
        else:
            parent = Path(directory).expanduser()
            made: Path | None = None
            try:
                parent.mkdir(parents=True, exist_ok=True)
                own = made = Path(tempfile.mkdtemp(prefix="mukv-disk-", dir=parent))
                # A probe write: a directory can exist and take a mkdir yet have no room or be
                # mounted read-only for files; better to know now than at the first spill.
                probe = own / ".probe"
                probe.write_bytes(b"\0" * ALIGN)
                probe.unlink()
            except OSError as exc:
                if made is not None:
                    shutil.rmtree(made, ignore_errors=True)
                reason = exc.strerror or str(exc)
                raise ValueError(f"disk_dir: cannot create or write {str(directory)!r} ({reason})") from None
        self._files = _Files(own, lock)
        self._finalizer = weakref.finalize(self, self._files.cleanup)
        self._chunks: dict[int, _Chunk] = {}
        self._current: int | None = None
        self._next_chunk = 0
        self._where: dict[int, tuple[int, int]] = {}  # key -> (chunk, bytes it holds there)
        self._nbytes = 0

    # ------------------------------------------------------------------ facts

    @property
    def directory(self) -> Path:
        """The directory holding this tier's chunk files (removed by :meth:`close`)."""
        return self._files.directory

    @property
    def nbytes(self) -> int:
        """Bytes of the live payloads held (without alignment padding or released space)."""
        return self._nbytes

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def chunk_files(self) -> list[Path]:
        """Paths of the chunk files that exist now."""
        return [chunk.path for chunk in self._chunks.values()]

    def __contains__(self, key: int) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    # ------------------------------------------------------------------ writing and reading

    def write(self, key: int, payload: BlockPayload) -> BlockPayload:
        """Write ``payload``'s tensors (every one :meth:`BlockPayload.map_tensors` visits, in its
        order) to a chunk and return the payload read back through the mapping: same shapes,
        dtypes and bytes, read-only, on the CPU. ``key`` must not be held already."""
        if self.closed:
            raise RuntimeError("disk tier: closed")
        if key in self._where:
            raise ValueError(f"disk tier: block {key} is already on disk")
        tensors: list[torch.Tensor] = []

        def collect(tensor: torch.Tensor) -> torch.Tensor:
            tensors.append(tensor.detach().to("cpu").contiguous())
            return tensor

        payload.map_tensors(collect)
        sizes = [_aligned(t.nbytes) for t in tensors]
        number, chunk = self._chunk_for(sum(sizes))
        offsets = list(itertools.accumulate(sizes, initial=chunk.used))[:-1]
        # Reserved before writing: the bytes of a write that fails half-way are never used again.
        chunk.used += sum(sizes)
        try:
            for tensor, offset in zip(tensors, offsets, strict=True):
                if tensor.nbytes:
                    self._pwrite(chunk, tensor, offset)
        except OSError as exc:
            raise OSError(exc.errno, f"disk tier: cannot write {chunk.path} ({exc.strerror or exc})") from None
        views = iter([self._view(chunk, tensor, at) for tensor, at in zip(tensors, offsets, strict=True)])
        mapped = payload.map_tensors(lambda _: next(views))
        chunk.live.add(key)
        held = sum(t.nbytes for t in tensors)
        self._where[key] = (number, held)
        self._nbytes += held
        if chunk.used >= chunk.capacity:
            self._seal(number)
        return mapped

    def release(self, key: int) -> None:
        """Forget block ``key``; its chunk file is deleted once none of its blocks is held."""
        number, held = self._where.pop(key)
        self._nbytes -= held
        chunk = self._chunks[number]
        chunk.live.discard(key)
        if not chunk.live:
            self._drop(number)

    def drop_cache(self) -> bool:
        """Ask the kernel to drop this tier's pages from RAM (this process's mappings, then the page
        cache, once written back), so that the next reads come from the disk: for measuring cold
        reads. Returns whether the kernel accepted every request (advice only: pages another
        process maps, or a filesystem that ignores the advice, stay)."""
        accepted = True
        for chunk in self._chunks.values():
            try:
                chunk.mapping._mmap.madvise(mmap.MADV_DONTNEED)  # type: ignore[attr-defined]
                fd = os.open(chunk.path, os.O_RDONLY)
                try:
                    os.fdatasync(fd)  # dirty pages are not dropped
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except (OSError, AttributeError, ValueError):
                accepted = False
        return accepted

    def close(self) -> None:
        """Remove the chunk files and this tier's directory. Views still referenced stay readable
        (the kernel keeps an unlinked file's pages while they are mapped); nothing more can be
        written."""
        self._chunks.clear()
        self._where.clear()
        self._current = None
        self._nbytes = 0
        self._finalizer()

    # ------------------------------------------------------------------ chunks

    def _chunk_for(self, size: int) -> tuple[int, _Chunk]:
        """The chunk the next ``size`` bytes go to: the current one if they fit, else a new one
        (of :attr:`chunk_bytes`, or of ``size`` when larger)."""
        if self._current is not None:
            chunk = self._chunks[self._current]
            if chunk.used + size <= chunk.capacity:
                return self._current, chunk
            self._seal(self._current)
        number = self._next_chunk
        self._next_chunk += 1
        path = self.directory / f"chunk-{number:06d}.bin"
        capacity = max(self.chunk_bytes, _aligned(size), ALIGN)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise OSError(exc.errno, f"disk tier: cannot create {path} ({exc.strerror or exc})") from None
        self._files.fds.add(fd)
        try:
            os.ftruncate(fd, capacity)  # sparse: blocks take disk space as they are written
            mapping = np.memmap(path, dtype=np.uint8, mode="r", shape=(capacity,))
        except (OSError, ValueError) as exc:
            self._close_fd(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise OSError(f"disk tier: cannot map {path} ({exc})") from None
        chunk = _Chunk(path=path, capacity=capacity, fd=fd, mapping=mapping)
        self._chunks[number] = chunk
        self._current = number
        return number, chunk

    def _seal(self, number: int) -> None:
        """No more blocks go to chunk ``number`` (its descriptor is closed; the mapping stays)."""
        chunk = self._chunks[number]
        if chunk.fd is not None:
            self._close_fd(chunk.fd)
            chunk.fd = None
        if self._current == number:
            self._current = None
        if not chunk.live:
            self._drop(number)

    def _drop(self, number: int) -> None:
        chunk = self._chunks.pop(number)
        if chunk.fd is not None:
            self._close_fd(chunk.fd)
        if self._current == number:
            self._current = None
        with contextlib.suppress(OSError):
            chunk.path.unlink()

    def _close_fd(self, fd: int) -> None:
        self._files.fds.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    @staticmethod
    def _pwrite(chunk: _Chunk, tensor: torch.Tensor, offset: int) -> None:
        assert chunk.fd is not None
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        while data:
            written = os.pwrite(chunk.fd, data, offset)
            data, offset = data[written:], offset + written

    @staticmethod
    def _view(chunk: _Chunk, tensor: torch.Tensor, offset: int) -> torch.Tensor:
        """``tensor``'s shape and dtype over the chunk's bytes at ``offset`` (a read-only view)."""
        if tensor.nbytes == 0:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        raw = chunk.mapping[offset : offset + tensor.nbytes]
        with warnings.catch_warnings():
            # The mapping is read-only on purpose: stored payloads are never written in place (a
            # write would fault instead of silently changing a stored block).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            flat = torch.from_numpy(raw)
        return flat.view(tensor.dtype).view(tensor.shape)
