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
offsets are in the chunk's safetensors metadata.

**Atomicity.** A new directory is written under a temporary name, fsynced and renamed into place.
Saving again to a directory this session last saved to (or was loaded from) writes only the
blocks stored since, as new chunks, then a new state file, then the manifest (temporary file,
fsync, rename): a crash at any point leaves the previous save readable; files the new manifest no
longer names are removed afterwards. Loading checks the format version, every file's checksum,
the model fingerprint and (when given) the method and config, and raises
:class:`~mukv.errors.MemoryFileError` or :class:`~mukv.errors.MemoryMismatchError` naming the problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(cpu, str(temporary), metadata=metadata)
    _fsync_file(temporary)
    os.replace(temporary, path)
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the memory saved in ``path``, its format and version checked (files are
    verified by :func:`load_session`). Raises :class:`MemoryFileError` for a missing directory or
    manifest, a damaged manifest, another format, or an unknown (newer) format version."""
    path = Path(path)
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


def _block_chunks(memory: BlockMemory, records: list[BlockRecord]) -> Iterator[list[BlockRecord]]:
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


def _write_chunk(memory: BlockMemory, records: list[BlockRecord], path: Path) -> dict[str, Any]:
    store = memory.store
    fields: dict[str, list[torch.Tensor]] = {name: [] for name in ("kv", "positions", "kept", "scores")}
    reps: list[torch.Tensor] = []
    entries = []
    offsets = dict.fromkeys([*fields, "representatives"], 0)
    for record in records:
        payload = store.payload(record.block_id)
        rep = store.representative(record.block_id)
        entry = {
            "record": dataclasses.asdict(record),
            "shapes": {},
            "offsets": {},
        }
        for name in fields:
            tensor = getattr(payload, name)
            fields[name].append(tensor)
            entry["shapes"][name] = list(tensor.shape)
            entry["offsets"][name] = offsets[name]
            offsets[name] += tensor.numel()
        reps.append(rep)
        entry["shapes"]["representatives"] = list(rep.shape)
        entry["offsets"]["representatives"] = offsets["representatives"]
        offsets["representatives"] += rep.numel()
        entries.append(entry)
    tensors = {name: _flat(parts, name) for name, parts in fields.items()}
    tensors["representatives"] = _flat(reps, "representatives")
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
                payload = BlockPayload(*(read(name, entry) for name in ("kv", "positions", "kept", "scores")))
                out.append((record, payload, read("representatives", entry)))
    except (KeyError, TypeError, ValueError, OSError, RuntimeError, SafetensorError) as exc:
        raise MemoryFileError(f"{path}: damaged block file ({type(exc).__name__}: {exc})") from None
    return out


# ---------------------------------------------------------------------------- saving


def _session_tensors(session: StreamSession) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    memory = session.memory
    tensors = {
        "clock.timestamps": torch.tensor(memory._timestamps, dtype=torch.float64),
        "clock.stamps": torch.tensor(memory._stamps, dtype=torch.float64),
    }
    pending = session._pending
    if pending is not None:
        tensors["session.pending_frames"] = pending
    meta = {"frames": session._frames, "pending_times": list(session._pending_times)}
    return tensors, meta


def save_session(session: StreamSession, path: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Save ``session``'s memory to directory ``path`` (see the module docstring); returns ``path``.

    ``extra``: JSON-ready facts of the caller's kept in the manifest (``read_manifest(path)["extra"]``).
    A directory that exists and is not a saved memory (and is not empty) is refused with
    :class:`MemoryFileError`, never overwritten. The session is locked while it is written.
    """
    path = Path(path)
    memory = session.memory
    if not isinstance(memory, BlockMemory):
        raise MemoryFileError(
            f"method {memory.name!r} cannot be saved (saving covers the block-based methods: mukv, rekv)"
        )
    previous: dict[str, Any] | None = None
    if path.exists():
        if not path.is_dir():
            raise MemoryFileError(f"{path}: exists and is not a directory; refusing to overwrite it")
        if (path / MANIFEST).is_file():
            # Only a memory this mukv can read is replaced: a directory that merely holds a file of
            # that name, or a memory saved by a newer mukv, is left as it is.
            try:
                previous = read_manifest(path)
            except MemoryFileError as exc:
                raise MemoryFileError(f"{exc}; refusing to overwrite {path}") from None
        elif any(path.iterdir()):
            raise MemoryFileError(f"{path}: exists and is not a saved memory; refusing to overwrite it")
    with session._lock:
        try:
            method_tensors, method_meta = memory.export_state()
        except NotImplementedError as exc:
            raise MemoryFileError(str(exc)) from None
        # An incremental save needs the directory to be the one this session last wrote or read.
        incremental = previous is not None and previous.get("save_id") == session._saved_as.get(path.resolve())
        save_id = uuid.uuid4().hex
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mukv_version": _version(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "save_id": save_id,
            "method": {"name": memory.name, "config": _json_ready(config_to_dict(memory.config))},
            "model": _model_identity(session.backend),
            "stream": {
                "fps": memory.fps,
                "units": memory.frames,
                "frames": session.frames_seen,
                "time": session.time,
                "frames_per_unit": session.backend.layout.frames_per_unit,
            },
            "extra": _json_ready(dict(extra or {})),
        }
        records = memory.saved_blocks()
        if incremental:
            assert previous is not None
            _save_incremental(session, path, previous, manifest, records, method_tensors, method_meta)
        else:
            _save_new(session, path, manifest, records, method_tensors, method_meta)
        session._saved_as[path.resolve()] = save_id
    return path


def _version() -> str:
    from mukv import __version__

    return __version__


def _state_entry(
    directory: Path,
    name: str,
    method_tensors: dict[str, torch.Tensor],
    method_meta: dict[str, Any],
    session: StreamSession,
) -> tuple[dict[str, Any], dict[str, Any]]:
    session_tensors, session_meta = _session_tensors(session)
    tensors = {**session_tensors, **{f"method.{k}": t for k, t in method_tensors.items()}}
    info = _write_tensors(directory / name, tensors, {"format": FORMAT})
    return {"file": name, "method": _json_ready(method_meta), "session": session_meta}, info


def _save_new(
    session: StreamSession,
    path: Path,
    manifest: dict[str, Any],
    records: list[BlockRecord],
    method_tensors: dict[str, torch.Tensor],
    method_meta: dict[str, Any],
) -> None:
    """The whole memory into a temporary sibling directory, fsynced, then renamed to ``path`` (a
    saved memory already there is moved aside first and removed once the new one is in place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save = manifest["save_id"][:8]
        files: dict[str, Any] = {}
        chunks = []
        for i, run in enumerate(_block_chunks(session.memory, records)):  # type: ignore[arg-type]
            name = f"blocks-{save}-{i}.safetensors"
            files[name] = _write_chunk(session.memory, run, temporary / name)  # type: ignore[arg-type]
            chunks.append({"file": name, "blocks": [r.block_id for r in run]})
        state_name = f"state-{save}.safetensors"
        manifest["state"], files[state_name] = _state_entry(temporary, state_name, method_tensors, method_meta, session)
        manifest["chunks"], manifest["files"] = chunks, files
        _write_json(temporary / MANIFEST, manifest)
        _fsync_dir(temporary)
        if path.exists():
            aside = path.with_name(f".{path.name}.{manifest['save_id'][:8]}.old")
            os.replace(path, aside)
            os.replace(temporary, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(temporary, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _save_incremental(
    session: StreamSession,
    path: Path,
    previous: dict[str, Any],
    manifest: dict[str, Any],
    records: list[BlockRecord],
    method_tensors: dict[str, torch.Tensor],
    method_meta: dict[str, Any],
) -> None:
    """New blocks as new chunks and a new state file next to the previous save's files, then the
    manifest (the commit point), then the files no longer named are removed."""
    live = {r.block_id for r in records}
    files: dict[str, Any] = {}
    chunks = []
    covered: set[int] = set()
    for chunk in previous["chunks"]:
        # Stored blocks never change; a block removed since is dropped from its chunk's list.
        kept = [i for i in chunk["blocks"] if i in live]
        if kept:
            chunks.append({"file": chunk["file"], "blocks": kept})
            files[chunk["file"]] = previous["files"][chunk["file"]]
            covered.update(kept)
    save = manifest["save_id"][:8]
    fresh = [r for r in records if r.block_id not in covered]
    for i, run in enumerate(_block_chunks(session.memory, fresh)):  # type: ignore[arg-type]
        name = f"blocks-{save}-{i}.safetensors"
        files[name] = _write_chunk(session.memory, run, path / name)  # type: ignore[arg-type]
        chunks.append({"file": name, "blocks": [r.block_id for r in run]})
    # Chunks in storage order: loading adopts blocks in increasing id order.
    chunks.sort(key=lambda chunk: min(chunk["blocks"]))
    state_name = f"state-{save}.safetensors"
    manifest["state"], files[state_name] = _state_entry(path, state_name, method_tensors, method_meta, session)
    manifest["chunks"], manifest["files"] = chunks, files
    _fsync_dir(path)
    _write_json(path / MANIFEST, manifest)
    _fsync_dir(path)
    for file in path.iterdir():
        if file.name != MANIFEST and file.name not in files:
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
    (:class:`MemoryMismatchError` otherwise); by default the saved ones are used. ``config``: the
    new session's settings (not saved: they change speed, never results). Raises
    :class:`MemoryFileError` for a missing, damaged, truncated or newer-version directory, and
    :class:`MemoryMismatchError` for another model (dimensions, dtype, frame layout or
    resolution, system prompt, weights) than the one the memory was built with.
    """
    from mukv.engine.session import StreamSession
    from mukv.memory.registry import create_memory

    path = Path(path)
    manifest = read_manifest(path)
    saved_method = manifest["method"]["name"]
    if method is not None and method != saved_method:
        raise MemoryMismatchError(f"{path}: saved with method {saved_method!r}, not {method!r}")
    try:
        cls = method_class(saved_method)
    except ValueError:
        raise MemoryFileError(f"{path}: saved with method {saved_method!r}, which this mukv does not have") from None
    saved_config = manifest["method"]["config"]
    if method_config is not None:
        current = _json_ready(config_to_dict(method_config))
        names = _differences(saved_config, current)
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
