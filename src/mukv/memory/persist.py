"""Saving a stream's memory to a directory and loading it back (``StreamSession.save`` / ``.load``).

A saved memory is everything a session needs to answer, and to go on ingesting, exactly as if it
had never been saved: the stored blocks (records, payloads, representatives), the method's
encoding state of frames not yet in whole blocks (MuKV's open groups and shared run, ReKV's
sliding window and open block), the stream clock (every unit's timestamp and stamp), the stream's
rate, and the session's frames of an incomplete temporal group (Qwen-VL). Question-time state
(provisional blocks, a provisional unit) is not saved: it is rebuilt by the next question.

**Layout** (format version :data:`FORMAT_VERSION`)::

    MEM/manifest.json            what the memory is (see below); written last: the commit point
    MEM/state-<save>.safetensors the clock, the method's open state and the session's pending frames
    MEM/blocks-<save>-<i>.safetensors  stored blocks, in chunks of at most ~256 MiB

``manifest.json`` holds ``format`` (``"mukv-memory"``), ``format_version``, ``mukv_version``,
``saved_at``, ``save_id`` (new at every save), ``method`` (name and full config), ``model``
(``model_id``, ``model_type`` and a fingerprint of what stored K/V depend on: the text model's
dimensions, dtype, frame layout and preprocessing resolution, the system prompt and a hash of
a few weight tensors), ``stream`` (fps, units, frames, time), ``state`` (the state file and the
method's metadata), ``chunks`` (each block file and the block ids it holds), ``files`` (sha256 and
size of every file, verified on load) and ``extra`` (the caller's, e.g. what the CLI encoded).

A block chunk holds, block after block, flat tensors ``kv`` (the model's dtype), ``positions`` and
``kept`` (int64), ``scores`` and ``representatives`` (float32); each block's record, shapes and
offsets are in the chunk's safetensors metadata. A quantized payload (``kv_dtype`` ``int8`` /
``int4``, :mod:`mukv.kv.quant`) is saved as it is held, exactly: its tensors ``kv.codes`` (uint8),
``kv.k_scale``, ``kv.k_min``, ``kv.v_scale``, ``kv.v_min`` take the place of ``kv``, and its entry's
``kv_form`` holds the bits, group, dense shape and dtype; an entry without ``kv_form`` is native
(as every memory saved before quantized payloads existed). The manifest's ``payloads`` counts the
saved blocks by form (``{"forms": {"int4": 120}}``).

**Atomicity.** A new directory is written under a temporary sibling name (``.MEM.<id>.tmp``),
fsynced and renamed into place. Saving to a directory that already holds a memory writes new files
next to the previous save's (only the blocks stored since, when this session last saved there or
was loaded from there; all of them otherwise), then a new state file, then the manifest (temporary
file, fsync, rename): the manifest is the commit point, so a crash at any point leaves the previous
save or the new one readable, and files of this module's naming (``blocks-*``, ``state-*``, its
temporary files) that the new manifest no longer names are removed afterwards; other files in the
directory are left alone. Memories whose directory was moved aside (``.MEM.<id>.old``) by a save
that did not finish, as earlier versions did, are moved back on the next load or save, and stale
temporary or aside siblings are removed once ``MEM`` holds a valid memory.

**Concurrency.** A save holds an exclusive ``flock`` on ``.MEM.lock`` (next to ``MEM``, so that it
survives the directory's rename) while it writes; loading holds it shared. Two saves into one
directory, from threads or processes, therefore run one after the other.

Loading checks the format version, every file's checksum,
the model fingerprint and (when given) the method and config, and raises
:class:`~mukv.errors.MemoryFileError` or :class:`~mukv.errors.MemoryMismatchError` naming the problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mukv.config import config_to_dict
from mukv.errors import MemoryFileError, MemoryMismatchError
from mukv.kv.blocks import BlockPayload, BlockRecord
from mukv.kv.options import StorageOptions, with_storage_defaults
from mukv.kv.quant import TENSOR_NAMES, QuantizedKV
from mukv.memory.blocks import BlockMemory
from mukv.memory.registry import method_class

if TYPE_CHECKING:
    from mukv.backends.base import Backend
    from mukv.config import SessionConfig
    from mukv.engine.session import StreamSession

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "load_session",
    "model_fingerprint",
    "read_manifest",
    "save_session",
]

FORMAT = "mukv-memory"
#: Bumped whenever a saved memory's layout or meaning changes; older versions are read or refused
#: with a clear error, newer ones are refused (they may hold state this version would drop).
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Names of the files a save writes inside a memory directory: only these are ever removed there (a
# file someone else put in the directory is left alone). Temporary files are ``.<name>.<id>.tmp``.
_OWN_FILES = ("blocks-*.safetensors", "state-*.safetensors", ".*.tmp")
# Largest block chunk written at once: saving copies a chunk's payloads into flat tensors first.
_CHUNK_BYTES = 256 << 20
# Elements of each weight tensor that the fingerprint hashes, spread over the tensor (weights are
# the same on any device).
_HASHED_ELEMENTS = 4096


# ---------------------------------------------------------------------------- model identity


def _json_ready(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons with a saved one."""
    return json.loads(json.dumps(value))


def _weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the name, shape and dtype of every parameter and ``_HASHED_ELEMENTS`` of its
    elements spread evenly over the whole tensor: a fine-tune or a merged adapter changes every
    element of the matrices it touches, so any touched tensor changes the hash (a hash of a few
    tensors' first elements let a checkpoint with other attention weights through); the same
    weights in another dtype give another hash; it costs a strided read per tensor."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _HASHED_ELEMENTS)
        sample = flat[::step][:_HASHED_ELEMENTS].cpu().contiguous()
        digest.update(f"{name}:{list(param.shape)}:{param.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(backend: Backend) -> dict[str, Any]:
    """What stored K/V depend on, as JSON-ready facts: the text model's dimensions, the dtype, the
    frame layout, the preprocessing (resolution), the system prompt and a hash of a few weights."""
    model = getattr(backend, "model", None)
    preprocessor = getattr(backend, "preprocessor", None)
    return _json_ready(
        {
            "text": dataclasses.asdict(backend.text),
            "dtype": str(backend.dtype).removeprefix("torch."),
            "layout": {"grid": list(backend.layout.grid), "frames_per_unit": backend.layout.frames_per_unit},
            "preprocessing": dataclasses.asdict(preprocessor) if dataclasses.is_dataclass(preprocessor) else None,
            "system_prompt_sha256": hashlib.sha256(backend.prompts.system.encode()).hexdigest(),
            "weights_sha256": None if model is None else _weights_hash(model),
        }
    )


def _model_identity(backend: Backend) -> dict[str, Any]:
    model = getattr(backend, "model", None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return {"model_id": backend.model_id, "model_type": model_type, "fingerprint": model_fingerprint(backend)}


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves where two JSON-ready values differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [prefix.rstrip(".") or "value"]


def _describe(saved: Any, current: Any, names: list[str], limit: int = 4) -> str:
    def leaf(data: Any, name: str) -> Any:
        for part in name.split("."):
            data = data.get(part) if isinstance(data, dict) else None
        return data

    shown = []
    for name in names[:limit]:
        a, b = leaf(saved, name), leaf(current, name)
        if isinstance(a, str) and len(a) > 16:
            a, b = f"{a[:12]}...", f"{str(b)[:12]}..."
        shown.append(f"{name}: saved {a!r}, now {b!r}")
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return "; ".join(shown) + more


# ---------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes renames durable; some filesystems refuse it (nothing more can be done there).
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """Write ``tensors`` (moved to CPU, contiguous) to ``path`` through a temporary file, fsynced;
    returns the file's sha256 and size."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    temporary = _temporary_name(path)
    save_file(cpu, str(temporary), metadata=metadata)
    _fsync_file(temporary)
    os.replace(temporary, path)
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _temporary_name(path: Path) -> Path:
    """A temporary name next to ``path``, unique to this write (two writers never share one)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = _temporary_name(path)
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the memory saved in ``path``, its format and version checked (files are
    verified by :func:`load_session`). Raises :class:`MemoryFileError` for a missing directory or
    manifest, a damaged manifest, another format, or an unknown (newer) format version. A memory
    left aside by a save that did not finish is moved back first (see the module docstring)."""
    path = Path(path)
    _recover_if_needed(path)
    return _read_manifest(path)


def _read_manifest(path: Path) -> dict[str, Any]:
    """:func:`read_manifest` without recovery (the checks alone)."""
    if not path.is_dir():
        raise MemoryFileError(f"{path}: no saved memory there (not a directory)")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise MemoryFileError(f"{path}: not a saved memory ({MANIFEST} is missing)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemoryFileError(f"{manifest_path}: damaged or truncated ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MemoryFileError(f"{manifest_path}: not a saved mukv memory (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise MemoryFileError(f"{manifest_path}: damaged (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise MemoryFileError(
            f"{path}: saved in memory format version {version} (by mukv {manifest.get('mukv_version', '?')}); this "
            f"mukv reads versions up to {FORMAT_VERSION}: upgrade mukv to load it"
        )
    for key in ("method", "model", "stream", "state", "chunks", "files"):
        if key not in manifest:
            raise MemoryFileError(f"{manifest_path}: damaged (no {key!r} entry)")
    return manifest


@contextlib.contextmanager
def _locked(path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``flock`` on ``.NAME.lock`` next to memory ``path`` (exclusive for writers, shared for
    readers). The lock file sits outside the directory because a new memory's directory is renamed
    into place. Where no lock file can be created (a read-only parent), readers go on unlocked:
    nothing can save there either."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if exclusive:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def delete_memory(path: str | Path) -> bool:
    """Remove the saved memory at ``path`` with everything this module keeps beside it (a cut
    save's temporary and set-aside directories, the lock file), under the exclusive lock, so a save
    in progress finishes first. ``False`` if there was nothing to remove. A link at ``path`` is
    refused (its target is not this module's to delete)."""
    path = Path(path)
    if path.is_symlink():
        raise MemoryFileError(f"{path}: is a link; not deleting its target")
    lock = path.with_name(f".{path.name}.lock")
    if not path.exists() and not lock.exists() and not _siblings(path):
        return False
    with _locked(path, exclusive=True):
        for leftover in [*_siblings(path), *([path] if path.is_dir() else [])]:
            shutil.rmtree(leftover)
        # Unlinked while held: a save that opened it before waits on this inode and then finds no
        # memory; one that opens it later creates a fresh lock file.
        lock.unlink(missing_ok=True)
    return True


def _siblings(path: Path) -> list[Path]:
    """Temporary (``.NAME.<id>.tmp``) and aside (``.NAME.<id>.old``) directories of memory ``path``.
    The id has no dot, so that memory ``a``'s siblings never include those of a memory ``a.b``."""
    prefix = f".{path.name}."
    out = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            name = entry.name
            if name.startswith(prefix) and name.endswith((".tmp", ".old")):
                middle = name[len(prefix) : -len(".tmp")]
                if middle and "." not in middle and entry.is_dir():
                    out.append(entry)
    return out


def _recover_if_needed(path: Path) -> None:
    """:func:`_recover` when a save left siblings (checked first without the lock: loading a memory
    in good order takes no exclusive lock, and a missing path leaves no lock file behind)."""
    if _siblings(path):
        with contextlib.suppress(OSError), _locked(path, exclusive=True):
            _recover(path)


def _recover(path: Path) -> None:
    """Undo what a save that did not finish left (the caller holds the exclusive lock): when
    ``path`` is missing, move back the newest complete memory among its aside or temporary
    siblings (a crash between moving the old directory aside and renaming the new one into place
    leaves both, each complete); once ``path`` holds a valid memory, remove the stale siblings."""
    siblings = _siblings(path)
    if not path.exists():
        complete = []
        for candidate in siblings:
            try:
                _verify_files(candidate, _read_manifest(candidate))
            except (MemoryFileError, OSError, KeyError, TypeError):
                continue
            complete.append(candidate)
        if not complete:
            return
        best = max(complete, key=lambda c: (c / MANIFEST).stat().st_mtime_ns)
        os.replace(best, path)
        _fsync_dir(path.parent)
        siblings.remove(best)
    try:
        _read_manifest(path)
    except MemoryFileError:
        return  # not a memory (or a newer one): nothing here is ours to remove
    for sibling in siblings:
        shutil.rmtree(sibling, ignore_errors=True)


def _verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest names exists with the recorded size and sha256."""
    names = {manifest["state"]["file"], *(chunk["file"] for chunk in manifest["chunks"])}
    missing = names - set(manifest["files"])
    if missing:
        raise MemoryFileError(f"{path}: damaged manifest (no checksum for {', '.join(sorted(missing))})")
    for name, recorded in manifest["files"].items():
        file = path / name
        if Path(name).name != name or not file.is_file():
            raise MemoryFileError(f"{path}: {name} is missing (the saved memory is incomplete)")
        size = file.stat().st_size
        if size != recorded["bytes"]:
            raise MemoryFileError(f"{file}: truncated or damaged ({size} bytes, {recorded['bytes']} were saved)")
        if _sha256(file) != recorded["sha256"]:
            raise MemoryFileError(f"{file}: damaged (its sha256 is not the one recorded when it was saved)")


# ---------------------------------------------------------------------------- blocks


def _block_chunks(records: list[BlockRecord]) -> Iterator[list[BlockRecord]]:
    """``records`` in runs of at most :data:`_CHUNK_BYTES` of payload."""
    run: list[BlockRecord] = []
    size = 0
    for record in records:
        if run and size + record.nbytes > _CHUNK_BYTES:
            yield run
            run, size = [], 0
        run.append(record)
        size += record.nbytes
    if run:
        yield run


def _flat(parts: list[torch.Tensor], what: str) -> torch.Tensor:
    dtypes = {p.dtype for p in parts}
    if len(dtypes) > 1:
        raise ValueError(f"save: block {what} tensors mix dtypes {sorted(map(str, dtypes))}")
    return torch.cat([p.reshape(-1) for p in parts])


def _payload_tensors(payload: BlockPayload) -> dict[str, torch.Tensor]:
    """A payload's tensors by the names a chunk stores them under (a quantized ``kv`` as its own
    tensors, ``kv.<name>``)."""
    kv = payload.kv
    tensors = {f"kv.{n}": t for n, t in kv.tensors().items()} if isinstance(kv, QuantizedKV) else {"kv": kv}
    return {**tensors, "positions": payload.positions, "kept": payload.kept, "scores": payload.scores}


def _payload_forms(snapshot: _Snapshot) -> dict[str, Any]:
    """The manifest's ``payloads`` entry: saved blocks counted by form (``native``, ``int8``, ``int4``)."""
    forms: dict[str, int] = {}
    for payload, _ in snapshot.blocks.values():
        forms[payload.form] = forms.get(payload.form, 0) + 1
    return {"forms": dict(sorted(forms.items()))}


def _write_chunk(snapshot: _Snapshot, records: list[BlockRecord], path: Path) -> dict[str, Any]:
    fields: dict[str, list[torch.Tensor]] = {}
    offsets: dict[str, int] = {}
    entries = []
    for record in records:
        payload, rep = snapshot.blocks[record.block_id]
        entry: dict[str, Any] = {
            "record": dataclasses.asdict(record),
            "shapes": {},
            "offsets": {},
        }
        for name, tensor in {**_payload_tensors(payload), "representatives": rep}.items():
            fields.setdefault(name, []).append(tensor)
            entry["shapes"][name] = list(tensor.shape)
            entry["offsets"][name] = offsets.get(name, 0)
            offsets[name] = entry["offsets"][name] + tensor.numel()
        if isinstance(payload.kv, QuantizedKV):
            entry["kv_form"] = payload.kv.meta()
        entries.append(entry)
    tensors = {name: _flat(parts, name) for name, parts in fields.items()}
    return _write_tensors(path, tensors, {"blocks": json.dumps(entries)})


def _read_chunk(path: Path, wanted: set[int]) -> list[tuple[BlockRecord, BlockPayload, torch.Tensor]]:
    """The blocks of a chunk whose ids are in ``wanted``, each tensor read on its own (peak memory
    stays one block above what is kept)."""
    out = []
    try:
        with safe_open(str(path), framework="pt") as handle:
            entries = json.loads((handle.metadata() or {})["blocks"])
            slices = {name: handle.get_slice(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)

            def read(name: str, entry: dict) -> torch.Tensor:
                shape = entry["shapes"][name]
                start = entry["offsets"][name]
                return slices[name][start : start + math.prod(shape)].reshape(shape)

            for entry in entries:
                record = BlockRecord(**entry["record"])
                if record.block_id not in wanted:
                    continue
                if "kv_form" in entry:
                    parts = {name: read(f"kv.{name}", entry) for name in TENSOR_NAMES}
                    kv: torch.Tensor | QuantizedKV = QuantizedKV.from_tensors(parts, entry["kv_form"])
                else:
                    kv = read("kv", entry)
                payload = BlockPayload(kv, *(read(name, entry) for name in ("positions", "kept", "scores")))
                out.append((record, payload, read("representatives", entry)))
    except (KeyError, TypeError, ValueError, OSError, RuntimeError, SafetensorError) as exc:
        raise MemoryFileError(f"{path}: damaged block file ({type(exc).__name__}: {exc})") from None
    return out


# ---------------------------------------------------------------------------- saving


@dataclasses.dataclass
class _Snapshot:
    """What a save writes, taken under the session's lock so that the files are written outside it
    (ingest and questions go on meanwhile). Stored payloads are never modified once stored, so
    references to them suffice; representatives (rows of a matrix that removals shift in place),
    the clock, the open state and pending frames (all changed by ingest) are copies."""

    records: list[BlockRecord]
    blocks: dict[int, tuple[BlockPayload, torch.Tensor]]
    state_tensors: dict[str, torch.Tensor]
    method_meta: dict[str, Any]
    session_meta: dict[str, Any]


def _snapshot(session: StreamSession) -> _Snapshot:
    """The session's saved state now (the caller holds ``session._lock``)."""
    memory = session.memory
    assert isinstance(memory, BlockMemory)
    try:
        method_tensors, method_meta = memory.export_state()
    except NotImplementedError as exc:
        raise MemoryFileError(str(exc)) from None
    records = memory.saved_blocks()
    store = memory.store
    blocks = {r.block_id: (store.payload(r.block_id), store.representative(r.block_id).clone()) for r in records}
    state = {
        "clock.timestamps": torch.tensor(memory._timestamps, dtype=torch.float64),
        "clock.stamps": torch.tensor(memory._stamps, dtype=torch.float64),
    }
    if session._pending is not None:
        state["session.pending_frames"] = session._pending.to("cpu", copy=True)
    # Copied to CPU memory (where they are written from) rather than next to the live state.
    state.update({f"method.{k}": t.detach().to("cpu", copy=True) for k, t in method_tensors.items()})
    session_meta = {"frames": session._frames, "pending_times": list(session._pending_times)}
    return _Snapshot(records, blocks, state, _json_ready(method_meta), session_meta)


def save_session(session: StreamSession, path: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Save ``session``'s memory to directory ``path`` (see the module docstring); returns ``path``.

    ``extra``: JSON-ready facts of the caller's kept in the manifest (``read_manifest(path)["extra"]``).
    A directory that exists and is not a saved memory (and is not empty) is refused with
    :class:`MemoryFileError`, never overwritten. The session is locked only while its state is
    copied (see :class:`_Snapshot`); the directory is locked against other saves while it is written.
    """
    path = Path(path)
    memory = session.memory
    if not isinstance(memory, BlockMemory):
        raise MemoryFileError(
            f"method {memory.name!r} cannot be saved (saving covers the block-based methods: mukv, rekv)"
        )
    if path.exists() and not path.is_dir():
        raise MemoryFileError(f"{path}: exists and is not a directory; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path, exclusive=True):
        _recover(path)
        previous: dict[str, Any] | None = None
        if path.exists():
            if not path.is_dir():
                raise MemoryFileError(f"{path}: exists and is not a directory; refusing to overwrite it")
            if (path / MANIFEST).is_file():
                # Only a memory this mukv can read is replaced: a directory that merely holds a file
                # of that name, or a memory saved by a newer mukv, is left as it is.
                try:
                    previous = _read_manifest(path)
                except MemoryFileError as exc:
                    raise MemoryFileError(f"{exc}; refusing to overwrite {path}") from None
            elif any(path.iterdir()):
                raise MemoryFileError(f"{path}: exists and is not a saved memory; refusing to overwrite it")
        with session._lock:
            snapshot = _snapshot(session)
            # Only blocks not in the previous save are written when the directory is the one this
            # session last wrote or read (the same stream: its stored blocks never change).
            incremental = previous is not None and previous.get("save_id") == session._saved_as.get(path.resolve())
            stream = {
                "fps": memory.fps,
                "units": memory.frames,
                "frames": session.frames_seen,
                "time": session.time,
                "frames_per_unit": session.backend.layout.frames_per_unit,
            }
            config = _json_ready(config_to_dict(memory.config))
        save_id = uuid.uuid4().hex
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mukv_version": _version(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "save_id": save_id,
            "method": {"name": memory.name, "config": config},
            "model": _model_identity(session.backend),
            "stream": stream,
            "payloads": _payload_forms(snapshot),
            "extra": _json_ready(dict(extra or {})),
        }
        if path.exists():
            _save_into(snapshot, path, previous if incremental else None, manifest)
        else:
            _save_new(snapshot, path, manifest)
        with session._lock:
            session._saved_as[path.resolve()] = save_id
    return path


def _version() -> str:
    from mukv import __version__

    return __version__


def _write_blocks(
    snapshot: _Snapshot, directory: Path, records: list[BlockRecord], save: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``records`` as new chunks in ``directory``: the chunks' entries and their files' checksums."""
    files: dict[str, Any] = {}
    chunks = []
    for i, run in enumerate(_block_chunks(records)):
        name = f"blocks-{save}-{i}.safetensors"
        files[name] = _write_chunk(snapshot, run, directory / name)
        # Kept tokens per block: a later save into the same directory rewrites a block the byte
        # budget has re-pruned since (fewer tokens) instead of reusing its old entry.
        chunks.append({"file": name, "blocks": [r.block_id for r in run], "tokens": [r.tokens for r in run]})
    return chunks, files


def _write_state(snapshot: _Snapshot, directory: Path, save: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state file: the manifest's ``state`` entry and the file's checksum."""
    name = f"state-{save}.safetensors"
    info = _write_tensors(directory / name, snapshot.state_tensors, {"format": FORMAT})
    return {"file": name, "method": snapshot.method_meta, "session": snapshot.session_meta}, {name: info}


def _save_new(snapshot: _Snapshot, path: Path, manifest: dict[str, Any]) -> None:
    """The whole memory into a temporary sibling directory, fsynced, then renamed to ``path`` (which
    does not exist: the caller holds the directory's lock)."""
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save = manifest["save_id"][:8]
        chunks, files = _write_blocks(snapshot, temporary, snapshot.records, save)
        manifest["state"], state_file = _write_state(snapshot, temporary, save)
        manifest["chunks"], manifest["files"] = chunks, {**files, **state_file}
        _write_json(temporary / MANIFEST, manifest)
        _fsync_dir(temporary)
        os.replace(temporary, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _save_into(snapshot: _Snapshot, path: Path, previous: dict[str, Any] | None, manifest: dict[str, Any]) -> None:
    """Save into existing directory ``path``: new chunks (of the blocks not in ``previous``, the
    previous save of this stream, when given; of all blocks otherwise) and a new state file next
    to the files there, then the manifest (the commit point: until it is renamed, the previous save
    is the one that loads), then this module's files the new manifest does not name are removed."""
    live = {r.block_id: r.tokens for r in snapshot.records}
    files: dict[str, Any] = {}
    chunks = []
    covered: set[int] = set()
    for chunk in previous["chunks"] if previous is not None else []:
        # A block removed since is dropped from its chunk's list, and so is one the byte budget
        # re-pruned since (its kept tokens changed: it is written again); others never change.
        saved_tokens = chunk.get("tokens") or [None] * len(chunk["blocks"])
        entries = [
            (i, n) for i, n in zip(chunk["blocks"], saved_tokens, strict=True) if i in live and n in (None, live[i])
        ]
        kept = [i for i, _ in entries]
        if kept:
            entry: dict[str, Any] = {"file": chunk["file"], "blocks": kept}
            if "tokens" in chunk:
                entry["tokens"] = [n for _, n in entries]
            chunks.append(entry)
            files[chunk["file"]] = previous["files"][chunk["file"]]  # type: ignore[index]
            covered.update(kept)
    save = manifest["save_id"][:8]
    fresh = [r for r in snapshot.records if r.block_id not in covered]
    new_chunks, new_files = _write_blocks(snapshot, path, fresh, save)
    chunks += new_chunks
    files.update(new_files)
    # Chunks in storage order: loading adopts blocks in increasing id order.
    chunks.sort(key=lambda chunk: min(chunk["blocks"]))
    manifest["state"], state_file = _write_state(snapshot, path, save)
    files.update(state_file)
    manifest["chunks"], manifest["files"] = chunks, files
    _fsync_dir(path)
    _write_json(path / MANIFEST, manifest)
    _fsync_dir(path)
    for file in path.iterdir():
        name = file.name
        if name not in files and any(fnmatch.fnmatchcase(name, pattern) for pattern in _OWN_FILES):
            with contextlib.suppress(OSError):
                file.unlink()


# ---------------------------------------------------------------------------- loading


def _config_from_dict(cls: type, data: Mapping[str, Any], default: Any = None) -> Any:
    """Rebuild a (nested) config dataclass from :func:`config_to_dict`'s output; nested classes are
    those of the default config's fields (tuples come back as tuples)."""
    default = cls() if default is None else default
    values = {}
    for f in dataclasses.fields(default):
        if f.name not in data:
            continue
        current = getattr(default, f.name)
        value = data[f.name]
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            value = _config_from_dict(type(current), value, current)
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return dataclasses.replace(default, **values)


#: Storage options a memory may be loaded with other values of: where and within how many bytes it
#: is kept from now on (a smaller ``memory_budget`` consolidates at once), not what it holds.
ADJUSTABLE = ("memory_budget", "ram_budget", "disk_dir")
#: Storage options that change nothing stored while payloads are native (``kv_dtype="native"``):
#: a native memory loads under any value of them.
NATIVE_INERT = ("kv_group", "kv_keys")


def load_session(
    backend: Backend,
    path: str | Path,
    *,
    method: str | None = None,
    method_config: Any = None,
    fps: float | None = None,
    config: SessionConfig | None = None,
) -> StreamSession:
    """The session saved in ``path``, on ``backend``, answering and ingesting exactly as the saved one.

    ``method``, ``method_config`` and ``fps``, when given, must be the saved ones
    (:class:`MemoryMismatchError` otherwise), except the storage options in :data:`ADJUSTABLE`,
    which a given ``method_config`` sets for the loaded memory; by default the saved ones are used. ``config``: the
    new session's settings (not saved: they change speed, never results). Raises
    :class:`MemoryFileError` for a missing, damaged, truncated or newer-version directory, and
    :class:`MemoryMismatchError` for another model (dimensions, dtype, frame layout or
    resolution, system prompt, weights) than the one the memory was built with.
    """
    path = Path(path)
    _recover_if_needed(path)
    with _locked(path, exclusive=False):
        return _load_session(backend, path, method, method_config, fps, config)


def _load_session(
    backend: Backend,
    path: Path,
    method: str | None,
    method_config: Any,
    fps: float | None,
    config: SessionConfig | None,
) -> StreamSession:
    """:func:`load_session` once the directory is locked against saves."""
    from mukv.engine.session import StreamSession
    from mukv.memory.registry import create_memory

    manifest = _read_manifest(path)
    saved_method = manifest["method"]["name"]
    if method is not None and method != saved_method:
        raise MemoryMismatchError(f"{path}: saved with method {saved_method!r}, not {method!r}")
    try:
        cls = method_class(saved_method)
    except ValueError:
        raise MemoryFileError(f"{path}: saved with method {saved_method!r}, which this mukv does not have") from None
    saved_config = manifest["method"]["config"]
    if issubclass(cls.config_class, StorageOptions) and isinstance(saved_config, dict):
        # Saved before some storage option existed: it was stored as that option's default.
        saved_config = with_storage_defaults(saved_config)
    if method_config is not None:
        current = _json_ready(config_to_dict(method_config))
        ignored = set(ADJUSTABLE)
        if saved_config.get("kv_dtype") == "native" == current.get("kv_dtype"):
            ignored |= set(NATIVE_INERT)  # they shape quantized payloads only: none is stored
        names = [n for n in _differences(saved_config, current) if n.split(".")[0] not in ignored]
        if names:
            raise MemoryMismatchError(
                f"{path}: saved with another {saved_method} config ({_describe(saved_config, current, names)})"
            )
    identity = _model_identity(backend)
    names = _differences(manifest["model"]["fingerprint"], identity["fingerprint"])
    if names:
        saved_model = manifest["model"].get("model_id")
        raise MemoryMismatchError(
            f"{path}: saved with another model ({saved_model}, {manifest['model'].get('model_type')}) than "
            f"{backend.model_id}: {_describe(manifest['model']['fingerprint'], identity['fingerprint'], names)}"
        )
    stream = manifest["stream"]
    saved_fps = stream.get("fps")
    if fps is not None and (saved_fps is None or not math.isclose(fps, saved_fps, rel_tol=1e-9)):
        raise MemoryMismatchError(f"{path}: the stream was sampled at {saved_fps} frames per second, not {fps}")
    _verify_files(path, manifest)
    try:
        rebuilt = _config_from_dict(cls.config_class, saved_config)
    except (TypeError, ValueError) as exc:
        raise MemoryFileError(f"{path}: damaged method config ({exc})") from None
    if _differences(saved_config, _json_ready(config_to_dict(rebuilt))):
        raise MemoryFileError(f"{path}: the saved {saved_method} config has fields this mukv does not know")
    if method_config is not None and isinstance(rebuilt, StorageOptions):
        rebuilt = dataclasses.replace(rebuilt, **{name: getattr(method_config, name) for name in ADJUSTABLE})
    memory = create_memory(saved_method, backend, rebuilt, fps=saved_fps)
    if not isinstance(memory, BlockMemory):
        raise MemoryFileError(f"{path}: method {saved_method!r} cannot be loaded")
    state = manifest["state"]
    try:
        with safe_open(str(path / state["file"]), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, ValueError, SafetensorError) as exc:
        raise MemoryFileError(f"{path}: damaged state file ({exc})") from None
    try:
        memory.import_clock(tensors["clock.timestamps"].tolist(), tensors["clock.stamps"].tolist())
        ids = sorted(i for chunk in manifest["chunks"] for i in chunk["blocks"])
        blocks = []
        for chunk in manifest["chunks"]:
            blocks += _read_chunk(path / chunk["file"], set(chunk["blocks"]))
        if sorted(record.block_id for record, _, _ in blocks) != ids:
            raise MemoryFileError(f"{path}: block files do not hold the blocks the manifest lists")
        for record, payload, representative in sorted(blocks, key=lambda item: item[0].block_id):
            memory.adopt_block(record, payload, representative)
        prefix = "method."
        own = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
        memory.import_state(own, state["method"])
        pending_times = [float(t) for t in state["session"]["pending_times"]]
        frames = int(state["session"]["frames"])
    # RuntimeError: tensors of shapes the metadata contradicts (a file whose checksum was recomputed
    # after an edit passes the checksums); SafetensorError: a block file that is not safetensors.
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, SafetensorError) as exc:
        raise MemoryFileError(f"{path}: damaged saved state ({type(exc).__name__}: {exc})") from None
    session = StreamSession(backend, memory, config=config)
    session._pending = tensors.get("session.pending_frames")
    session._pending_times = pending_times
    session._frames = frames
    session._saved_as[path.resolve()] = manifest["save_id"]
    return session
