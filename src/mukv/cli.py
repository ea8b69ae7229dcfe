"""The ``mukv`` command line: ask, chat, demo, tiny-model, methods, serve.

Heavy modules (torch, transformers, PyAV) are imported inside the commands, so ``mukv --help``
is instant. User errors (bad paths, values, model ids) print one line and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mukv.config import DEFAULT_MODEL_ID

if TYPE_CHECKING:
    from mukv.memory.base import MemoryStats

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Answer questions about long, live video streams with a KV-cache memory.",
)

ModelOption = Annotated[
    str,
    typer.Option("--model", "-m", help="Hugging Face hub id, local checkpoint directory, or mukv-tiny (shipped)."),
]
MethodOption = Annotated[str, typer.Option("--method", help="Memory method (see `mukv methods`).")]
FpsOption = Annotated[float, typer.Option("--fps", help="Frames sampled per second of video.")]
NpyFpsOption = Annotated[float | None, typer.Option("--npy-fps", help="Frame rate of an .npy frame array.")]
DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.")]
PresetOption = Annotated[
    str | None, typer.Option("--preset", help="Method preset, e.g. paper or release for mukv (default: its default).")
]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Method option KEY=VALUE (repeatable), e.g. num_frames=16.")
]


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Report user errors in one line (exit status 2) instead of a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mukv.errors import MukvError

        _quiet_libraries()
        try:
            return command(*args, **kwargs)
        except (MukvError, ValueError, FileNotFoundError, ImportError) as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None

    return wrapper


_VERBOSE = False


@app.callback()
def _options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the warnings of the libraries underneath (transformers, ...).")
    ] = False,
) -> None:
    global _VERBOSE
    _VERBOSE = verbose


def _quiet_libraries() -> None:
    """Keep third-party warnings and progress bars out of the output a person reads (``--verbose``
    shows them); this package's own warnings are printed as ``warning: ...`` lines."""
    root = logging.getLogger()
    if not root.handlers:  # a program embedding the CLI (or a test harness) keeps its own logging
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        root.addHandler(handler)
        # Other libraries' loggers inherit the root's level: only their errors come through.
        root.setLevel(logging.WARNING if _VERBOSE else logging.ERROR)
        logging.getLogger("mukv").setLevel(logging.WARNING)
    if _VERBOSE:
        return
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"mukv(\.|$)")
    if "transformers" in sys.modules:
        from transformers import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    else:  # read when transformers loads: a command that fails early never pays for importing it
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _open_session(
    model: str,
    method: str,
    device: str,
    dtype: str,
    assignments: list[str] | None,
    preset: str | None = None,
    *,
    fps: float | None = None,
):
    from mukv.backends import load_backend
    from mukv.config import parse_assignments
    from mukv.engine import StreamSession
    from mukv.memory import method_config

    config = method_config(method, parse_assignments(assignments), preset)  # validate before loading the model
    typer.secho(f"loading {model} on {device} ...", err=True, dim=True)
    backend = load_backend(model, device=device, dtype=dtype)
    # The stream's sampling rate places its frames in time (Qwen2.5-VL); the source knows it.
    return StreamSession(backend, method, method_config=config, fps=fps)


def _ingest_with_progress(session, source, until: float | None, fps: float) -> int:
    """Ingest up to ``until`` with a progress bar over the frames expected by then; the bar is
    finished (on a line of its own) before anything else is printed."""
    from tqdm import tqdm

    expected = source.expected_frames
    if until is not None:
        by_then = int(until * fps) + 1
        expected = by_then if expected is None else min(expected, by_then)
    with tqdm(total=expected, unit="frame", desc="encoding", file=sys.stderr, leave=True) as bar:
        count = session.ingest_source(source, until, progress=bar.update)
        bar.total = count  # the estimate may be off: the bar ends at what was encoded
    return count


def _check_time(value: float | None, name: str) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise ValueError(f"{name}: must be a finite number of seconds >= 0, got {value}")


def _check_max_new_tokens(value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {value}")


def _memory_size(stats: MemoryStats) -> str:
    """``stats``' stored bytes in MiB, and how many of them are on disk (``ram_budget``)."""
    text = f"{stats.total_bytes / 2**20:.1f} MiB"
    return f"{text} ({stats.disk_bytes / 2**20:.1f} MiB on disk)" if stats.disk_bytes else text


def _print_answer(answer, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(answer.to_dict()))
        return
    typer.echo(f"Q [{answer.time:.1f}s, {answer.frames_seen} frames]: {answer.question}")
    typer.echo(f"A: {answer.text}")
    spans = ", ".join(f"{b.start_time:.0f}-{b.end_time:.0f}s" for b in answer.retrieved[:8])
    more = f" (+{len(answer.retrieved) - 8} more)" if len(answer.retrieved) > 8 else ""
    t = answer.timings
    typer.secho(
        f"   {answer.method}: {answer.context_tokens} cache tokens, first token {t.first_token:.2f}s, "
        f"total {t.total:.2f}s, memory {_memory_size(answer.memory)}; used {spans}{more}",
        dim=True,
    )


@app.command()
@_user_errors
def ask(
    question: Annotated[list[str], typer.Option("--question", "-q", help="Question (repeatable).")],
    video: Annotated[Path | None, typer.Argument(help="Video file or .npy frame array.")] = None,
    memory: Annotated[
        Path | None,
        typer.Option("--memory", help="Answer from a memory saved by `mukv encode` instead of a video."),
    ] = None,
    at: Annotated[float | None, typer.Option("--at", help="Ask at this time in seconds (default: the end).")] = None,
    choice: Annotated[
        list[str] | None, typer.Option("--choice", "-c", help="Multiple-choice option (repeatable).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Hugging Face hub id, local checkpoint directory, or mukv-tiny (shipped). "
            f"Default: {DEFAULT_MODEL_ID}; "
            "with --memory, the one it was encoded with.",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="Memory method (see `mukv methods`). Default: full; with --memory, the saved one."
        ),
    ] = None,
    fps: FpsOption = 0.5,
    npy_fps: NpyFpsOption = None,
    device: DeviceOption = "cpu",
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16 (auto with --memory: the saved one).")
    ] = "auto",
    preset: PresetOption = None,
    set_: SetOption = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Answer length limit in tokens.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON record per answer.")] = False,
) -> None:
    """Answer questions about VIDEO at time --at, from frames up to then only; or, with --memory MEM,
    from a memory saved by `mukv encode` (the video is not needed; the saved method, config and rate
    are used, and --method/--preset/--set, when given, must be the saved ones)."""
    from mukv.backends.prompts import PromptTemplate, validate_question
    from mukv.video import open_source

    # Everything is checked before the model loads and the video is encoded.
    questions = [validate_question(q) for q in question]
    for text in questions:
        PromptTemplate().render_question(text, choice)  # choices: count, empty options
    _check_time(at, "--at")
    _check_max_new_tokens(max_new_tokens)
    if (video is None) == (memory is None):
        raise ValueError("give a VIDEO or --memory MEM (one of them)")
    if memory is not None:
        session = _open_memory(memory, model, method, device, dtype, set_, preset)
        if at is not None and session.time is not None and at < session.time:
            raise ValueError(
                f"--at: {at:g} s is before the end of the saved memory ({session.time:.1f} s): a saved memory "
                "answers at its end or later"
            )
    else:
        assert video is not None
        source = open_source(video, sample_fps=fps, npy_fps=npy_fps)
        if at is not None and source.duration is not None and at > source.duration + 1.0 / fps:
            source.close()
            raise ValueError(f"--at: {at:g} s is after the end of {video.name} ({source.duration:.1f} s)")
        session = _open_session(
            model or DEFAULT_MODEL_ID, method or "full", device, dtype, set_, preset, fps=source.sample_fps or fps
        )
    for text in questions:
        session.check_question(text, choice, max_new_tokens=max_new_tokens)
    if memory is None:
        _ingest_with_progress(session, source, at, fps)
    # From a video, frames up to --at were ingested and the question is at the last of them; a saved
    # memory ends where it ends, and --at (not before that) is the question's time.
    when = at if memory is not None else None
    for text in questions:
        _print_answer(session.ask(text, choice, max_new_tokens=max_new_tokens, at=when), as_json)


def _open_memory(
    memory: Path,
    model: str | None,
    method: str | None,
    device: str,
    dtype: str,
    assignments: list[str] | None,
    preset: str | None,
):
    """The session saved in ``memory`` on ``model`` (default: the one it was saved with) in the saved
    dtype (``auto``); ``method``, ``--set`` and ``--preset``, when given, must be the saved ones."""
    from mukv.backends import load_backend
    from mukv.config import parse_assignments
    from mukv.engine import StreamSession
    from mukv.memory import method_config
    from mukv.memory.persist import read_manifest

    manifest = read_manifest(memory)  # before the model loads: a wrong path fails at once
    saved_method = manifest["method"]["name"]
    config = None
    if assignments or preset:
        config = method_config(method or saved_method, parse_assignments(assignments), preset)
    encoded = manifest.get("extra", {}).get("encode")
    if encoded is not None and not encoded.get("complete", False):
        typer.secho(
            f"warning: {memory} holds an interrupted encode ({manifest['stream']['frames']} frames, up to "
            f"{manifest['stream']['time']:.1f} s); run the same `mukv encode` again to finish it",
            fg=typer.colors.YELLOW,
            err=True,
        )
    model = model or manifest["model"]["model_id"]
    if dtype == "auto":
        dtype = manifest["model"]["fingerprint"]["dtype"]
    typer.secho(f"loading {model} on {device} ...", err=True, dim=True)
    backend = load_backend(model, device=device, dtype=dtype)
    return StreamSession.load(backend, memory, method=method, method_config=config)


def _video_identity(video: Path) -> dict[str, Any]:
    """What tells one video file from another without reading it whole: its size and the sha256 of
    its first and last MiB (the path and modification time are kept for the messages)."""
    import hashlib

    stat = video.stat()
    digest = hashlib.sha256()
    with video.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        if stat.st_size > 2 << 20:
            handle.seek(-(1 << 20), os.SEEK_END)
        digest.update(handle.read(1 << 20))
    return {
        "path": str(video.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": digest.hexdigest(),
    }


@app.command()
@_user_errors
def encode(
    video: Annotated[Path, typer.Argument(help="Video file or .npy frame array.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Memory directory to write (an interrupted encode resumes there).")
    ],
    model: ModelOption = DEFAULT_MODEL_ID,
    method: Annotated[str, typer.Option("--method", help="Memory method: mukv or rekv.")] = "mukv",
    fps: FpsOption = 0.5,
    npy_fps: NpyFpsOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    preset: PresetOption = None,
    set_: SetOption = None,
    checkpoint_every: Annotated[
        int, typer.Option(help="Save progress to OUT every N frames (an interruption loses at most these).")
    ] = 64,
) -> None:
    """Encode VIDEO into a memory directory OUT that `mukv ask --memory OUT` answers from.

    Resumable: progress is saved every --checkpoint-every frames and on Ctrl-C / SIGTERM; running the
    same command again continues where it stopped (OUT must hold an encode of the same video with
    the same method, config and rate), and the result is the one an uninterrupted encode gives.
    """
    import contextlib
    import signal

    from tqdm import tqdm

    from mukv.backends import load_backend
    from mukv.config import config_to_dict, parse_assignments
    from mukv.engine import StreamSession
    from mukv.errors import MemoryFileError, MemoryMismatchError, VideoError
    from mukv.memory import method_config
    from mukv.memory.persist import MANIFEST, read_manifest
    from mukv.video import open_source

    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every: must be >= 1, got {checkpoint_every}")
    config = method_config(method, parse_assignments(set_), preset)
    if not video.is_file():
        raise FileNotFoundError(f"{video}: no such video file")
    identity = _video_identity(video)
    settings = json.loads(
        json.dumps({"method": method, "config": config_to_dict(config), "fps": fps, "npy_fps": npy_fps})
    )
    # Reading the manifest first moves back a memory that a save cut by a crash left aside; a
    # damaged one is reported below, when it is read for the checks.
    with contextlib.suppress(MemoryFileError):
        read_manifest(out)
    resume = out.is_dir() and (out / MANIFEST).exists()
    if resume:
        done = read_manifest(out).get("extra", {}).get("encode")
        if done is None:
            raise MemoryMismatchError(
                f"{out}: holds a saved memory that is not an encode of a video; choose another -o"
            )
        if {k: done["video"].get(k) for k in ("size", "sha256")} != {k: identity[k] for k in ("size", "sha256")}:
            raise MemoryMismatchError(
                f"{out}: holds an encode of another video ({done['video'].get('path')}); choose another -o or delete it"
            )
        changed = [k for k in settings if done["settings"].get(k) != settings[k]]
        if changed:
            raise MemoryMismatchError(
                f"{out}: was encoded with other settings ({', '.join(changed)} differ); run the same command as then, "
                "or choose another -o"
            )
        if done.get("complete"):
            typer.echo(f"{out} already holds all of {video.name} ({done['frames']} frames)")
            return
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not a saved memory; choose another -o")
    source = open_source(video, sample_fps=fps, npy_fps=npy_fps)
    rate = source.sample_fps or fps
    typer.secho(f"loading {model} on {device} ...", err=True, dim=True)
    backend = load_backend(model, device=device, dtype=dtype)
    if resume:
        session = StreamSession.load(backend, out, method=method, method_config=config, fps=rate)
    else:
        session = StreamSession(backend, method, method_config=config, fps=rate)
    batch_frames = session.config.encode_batch_frames
    done_frames = session.frames_seen
    if done_frames:
        # The encoded frames are read again (not encoded) in the batches they were encoded in, so
        # that the frames after them are batched as in an uninterrupted encode.
        skipped = 0
        while skipped < done_frames and (batch := source.next_batch(batch_frames, until=session.time)) is not None:
            skipped += len(batch)
        if skipped != done_frames:
            raise VideoError(f"{video}: {done_frames} frames were encoded, but the video now has {skipped} up to then")
        typer.secho(f"resuming after {done_frames} frames ({session.time:.1f} s)", err=True, dim=True)

    def save(complete: bool) -> None:
        frames = session.frames_seen
        record = {"video": identity, "settings": settings, "complete": complete, "frames": frames}
        session.save(out, extra={"encode": record})

    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)  # acted on between batches: a checkpoint is never cut in half

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        since = 0
        with tqdm(
            total=source.expected_frames, initial=done_frames, unit="frame", desc="encoding", file=sys.stderr
        ) as bar:
            while not stopped and (batch := source.next_batch(batch_frames)) is not None:
                session.ingest(batch.frames, batch.timestamps)
                bar.update(len(batch))
                since += len(batch)
                if since >= checkpoint_every and not stopped:
                    save(complete=False)
                    since = 0
            if not stopped:
                bar.total = bar.n
        if stopped:
            save(complete=False)
            typer.secho(
                f"interrupted after {session.frames_seen} frames; saved to {out}: run the same command to resume",
                fg=typer.colors.YELLOW,
                err=True,
            )
            raise typer.Exit(code=128 + stopped[0])
        save(complete=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        source.close()
    stats = session.stats()
    typer.echo(
        f"encoded {session.frames_seen} frames ({session.time or 0:.1f} s) of {video.name} into {out}: "
        f"{session.memory.name}, {_memory_size(stats)}"
    )


@app.command()
@_user_errors
def chat(
    video: Annotated[Path, typer.Argument(help="Video file or .npy frame array, played as a live stream.")],
    model: ModelOption = DEFAULT_MODEL_ID,
    method: MethodOption = "full",
    fps: FpsOption = 0.5,
    npy_fps: NpyFpsOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    preset: PresetOption = None,
    set_: SetOption = None,
    speed: Annotated[float, typer.Option(help="Stream playback speed (1 = real time).")] = 1.0,
    max_new_tokens: Annotated[int | None, typer.Option(help="Answer length limit in tokens.")] = None,
) -> None:
    """Type questions while VIDEO plays as a live stream; each is answered at the current stream time.

    Lines starting with / are commands: /time shows the stream clock, /quit leaves.
    """
    from mukv.video import open_source

    if not speed > 0 or not math.isfinite(speed):
        raise ValueError(f"--speed: must be a positive number, got {speed}")
    _check_max_new_tokens(max_new_tokens)
    source = open_source(video, sample_fps=fps, npy_fps=npy_fps)
    session = _open_session(model, method, device, dtype, set_, preset, fps=source.sample_fps or fps)
    stop = threading.Event()
    failure: list[BaseException] = []
    started = time.monotonic()

    def play() -> None:
        try:
            while not stop.is_set() and not source.exhausted:
                session.ingest_source(source, until=(time.monotonic() - started) * speed)
                stop.wait(0.05)
        except BaseException as exc:  # reported to the user by the main thread
            failure.append(exc)

    player = threading.Thread(target=play, daemon=True)
    player.start()
    typer.echo("Streaming. Type a question and press Enter (/time, /quit).")
    try:
        for raw in sys.stdin.buffer:
            if failure:
                raise failure[0]
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                typer.secho(
                    f"error: that line is not UTF-8 text (byte {exc.start}); type it again",
                    fg=typer.colors.RED,
                    err=True,
                )
                continue
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/time":
                now = session.time
                clock = "no frames yet" if now is None else f"{now:.1f}s"
                typer.echo(
                    f"stream time {clock}, {session.frames_seen} frames, {'ended' if source.exhausted else 'live'}"
                )
                continue
            while session.time is None and player.is_alive():
                time.sleep(0.05)
            _stream_answer(session, text, max_new_tokens)
    finally:
        stop.set()
        player.join()
    if failure:
        raise failure[0]


def _stream_answer(session, question: str, max_new_tokens: int | None) -> None:
    from mukv.engine import DoneEvent, TokenEvent
    from mukv.errors import MukvError

    try:
        events = session.ask_stream(question, max_new_tokens=max_new_tokens)
        typer.echo(f"[{session.time:.1f}s] ", nl=False)
        for event in events:
            if isinstance(event, TokenEvent):
                typer.echo(event.text, nl=False)
            elif isinstance(event, DoneEvent):
                a = event.answer
                typer.echo("")
                typer.secho(
                    f"   ({a.frames_seen} frames, {a.context_tokens} cache tokens, {a.timings.total:.2f}s)", dim=True
                )
    except (MukvError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)


@app.command("tiny-model")
@_user_errors
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    force: Annotated[bool, typer.Option(help="Write into a non-empty directory.")] = False,
    family: Annotated[
        str, typer.Option(help="Model family: llava_onevision, qwen2_5_vl, qwen3_vl (its config's model_type).")
    ] = "llava_onevision",
) -> None:
    """Build a tiny random checkpoint offline (loads like a hub checkpoint with --model DIR)."""
    from mukv.backends.tiny import build_tiny_model
    from mukv.backends.tiny_qwen import FAMILIES, build_tiny_qwen

    names = {"llava_onevision": "LLaVA-OneVision", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}
    if family not in ("llava_onevision", *FAMILIES):
        raise ValueError(f"--family: expected one of llava_onevision, {', '.join(FAMILIES)}, got {family!r}")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ValueError(f"{directory} is not empty (use --force to write into it)")
    if family == "llava_onevision":
        path = build_tiny_model(directory, seed=seed)
    else:
        path = build_tiny_qwen(directory, family, seed=seed)
    typer.echo(f"tiny {names.get(family, family)} written to {path} (random weights: it answers nonsense)")


@app.command()
def methods() -> None:
    """List the memory methods and their options."""
    import dataclasses

    from mukv.memory import available_methods, method_config, method_presets

    def flat(config: object, prefix: str = "") -> list[str]:
        items = []
        for f in dataclasses.fields(config):  # type: ignore[arg-type]
            value = getattr(config, f.name)
            if dataclasses.is_dataclass(value):
                items.extend(flat(value, f"{prefix}{f.name}."))
            else:
                items.append(f"{prefix}{f.name}={value!r}")
        return items

    for name in available_methods():
        presets = method_presets(name)
        typer.echo(f"{name}" + (f" (presets: {', '.join(presets)})" if presets else ""))
        typer.echo("    " + ", ".join(flat(method_config(name))))


@app.command()
@_user_errors
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Where the demo video goes (default: ~/.cache/mukv/demo).")
    ] = None,
    methods_: Annotated[
        str, typer.Option("--methods", help="Comma-separated memory methods.")
    ] = "mukv,rekv,recent,uniform,full",
    model: Annotated[
        str, typer.Option("--model", "-m", help="Checkpoint (default: mukv-tiny, shipped and trained on such streams).")
    ] = "mukv-tiny",
    frames: Annotated[int, typer.Option(help="Length of the generated stream in frames (one every 2 s).")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the generated stream.")] = 0,
) -> None:
    """Offline demo: a generated stream, questions asked as it plays, answers next to the reference."""
    from mukv.demo import run_demo

    run_demo(
        workdir or Path.home() / ".cache" / "mukv" / "demo",
        [m.strip() for m in methods_.split(",") if m.strip()],
        model=model,
        frames=frames,
        seed=seed,
    )


@app.command("eval")
@_user_errors
def eval_(
    benchmark: Annotated[str, typer.Argument(help="rvs-ego, rvs-movie, streamingbench-rt, ovo-bench or generic.")],
    anno: Annotated[Path, typer.Option("--anno", help="Annotation file.")],
    videos: Annotated[Path, typer.Option("--videos", help="Root directory searched for the videos by file name.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (created; an interrupted run resumes here).")],
    model: ModelOption = DEFAULT_MODEL_ID,
    method: MethodOption = "mukv",
    preset: PresetOption = None,
    set_: SetOption = None,
    fps: FpsOption = 0.5,
    npy_fps: NpyFpsOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    shard: Annotated[
        str | None, typer.Option(help="Run shard i of n (i/n, i from 0); merge with `mukv merge`.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Answer at most N questions (quick looks).")] = None,
    allow_missing: Annotated[bool, typer.Option(help="Run the videos that exist when some are missing.")] = False,
    retry_failed: Annotated[
        bool, typer.Option(help="Run again the videos and questions that failed in earlier runs (failures.jsonl).")
    ] = False,
    max_new_tokens: Annotated[int | None, typer.Option(help="Answer length limit in tokens.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Model workers on Ray: N CPU workers, or one per GPU with --device cuda (needs mukv[ray])."),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run the workers on a running Ray cluster (auto: the one `ray start` made here). "
            "Default --workers there: one per GPU (cuda) or per node (cpu).",
        ),
    ] = None,
) -> None:
    """Run a streaming benchmark: predictions go to OUT/predictions*.jsonl as they arrive.

    One process owns a run directory (per shard) at a time; an interrupted run resumes where it
    stopped; a video that fails to decode is recorded in OUT/failures*.jsonl and the run goes on.
    With --workers/--ray, Ray workers answer whole videos and this process writes their answers.
    """
    distributed = workers is not None or ray_address is not None
    if distributed:
        if shard:
            raise ValueError(
                "--shard cannot be combined with --workers/--ray: the workers share the videos of one run "
                "(use one or the other)"
            )
        if workers is not None and workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {workers}")
        if ray_address is not None and not ray_address.strip():
            raise ValueError("--ray: expected a cluster address (e.g. auto or 10.0.0.1:6379)")
        from mukv.eval.distributed import require_ray

        require_ray()  # before anything loads: a missing extra is reported at once
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mukv.config import parse_assignments
    from mukv.eval.runner import RunConfig, Shard, run_benchmark

    config = RunConfig(
        benchmark=benchmark,
        annotation=str(anno),
        videos=str(videos),
        model=model,
        method=method,
        preset=preset,
        overrides=parse_assignments(set_),
        sample_fps=fps,
        npy_fps=npy_fps,
        device=device,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
    )
    bars: list[tqdm] = []  # made when the first question is asked: nothing is drawn for a refused command

    def progress(questions, count):
        if not bars:
            bars.append(tqdm(unit="question", desc="answering", file=sys.stderr, dynamic_ncols=True))
        bar = bars[0]
        bar.total = (bar.total or 0) + count
        bar.refresh()
        for question in questions:
            yield question
            bar.update(1)
            rate = bar.format_dict.get("elapsed", 0) / max(bar.n, 1)
            bar.set_postfix_str(f"{rate:.2f} s/question")

    def run_progress(state) -> None:
        """The whole distributed run on one bar: questions (with the ETA), videos and workers."""
        if not bars:
            bars.append(tqdm(unit="question", desc="answering", file=sys.stderr, dynamic_ncols=True))
        bar = bars[0]
        bar.total = state.questions_total
        bar.update(state.questions_done - bar.n)
        bar.set_postfix_str(f"videos {state.videos_done}/{state.videos_total}, {state.workers} worker(s)")

    try:
        with logging_redirect_tqdm():  # warnings while the bar is drawn get lines of their own
            if distributed:
                from mukv.eval.distributed import run_distributed

                summary = run_distributed(
                    config,
                    out,
                    workers=workers,
                    address=ray_address,
                    limit=limit,
                    allow_missing=allow_missing,
                    retry_failed=retry_failed,
                    progress=run_progress,
                    verbose=_VERBOSE,
                )
            else:
                summary = run_benchmark(
                    config,
                    out,
                    shard=Shard.parse(shard),
                    limit=limit,
                    allow_missing=allow_missing,
                    retry_failed=retry_failed,
                    progress=progress,
                )
    finally:
        for bar in bars:
            bar.close()
    for warning in summary.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    for failure in summary.failed:
        affected = f"{failure['stage']}, {len(failure['qids'])} question(s)"
        typer.secho(
            f"failed: {failure['video_id']} ({affected}): {failure['reason']}",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(
        f"{summary.answered} answered, {summary.skipped_done} already done"
        + (f", {len(summary.missing)} videos missing" if summary.missing else "")
        + (
            f", {summary.failed_questions} questions failed ({len(summary.failed_videos)} videos)"
            if summary.failed
            else ""
        )
        + (f" ({summary.skipped_failed} skipped: use --retry-failed)" if summary.skipped_failed else "")
        + f"; predictions in {out}"
    )
    if summary.worker_failed:
        typer.secho(
            f"error: {len(summary.worker_failed)} video(s) failed on every attempt of a worker: "
            f"{', '.join(summary.worker_failed)} (see {out / 'failures.jsonl'}; run again with --retry-failed)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)


@app.command()
@_user_errors
def merge(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with shard files.")],
    allow_partial: Annotated[
        bool, typer.Option(help="Merge even when shards or questions are missing (they are listed).")
    ] = False,
) -> None:
    """Merge shard prediction files into RUN_DIR/predictions.jsonl (records already there are kept).

    Refuses while a shard is being written, and when shards or questions are missing unless
    --allow-partial.
    """
    from mukv.eval.runner import merge_predictions

    path = merge_predictions(run_dir, allow_partial=allow_partial)
    typer.echo(f"merged into {path}")


@app.command("make-benchmark")
@_user_errors
def make_benchmark(
    directory: Annotated[Path, typer.Argument(help="Where to write annotations.json and videos/.")],
    videos: Annotated[int, typer.Option(help="Number of videos.")] = 2,
    duration: Annotated[float, typer.Option(help="Seconds per video.")] = 120.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a small synthetic benchmark in the RVS layout (mp4 and .npy videos at 2 fps)."""
    from mukv.eval.synthetic import write_benchmark

    path = write_benchmark(directory, videos=videos, duration=duration, seed=seed)
    typer.echo(f"wrote {path} and {directory / 'videos'} (.npy videos are at 2 fps: pass --npy-fps 2)")


@app.command()
@_user_errors
def judge(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `mukv eval`.")],
    judge_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible base URL (env MUKV_JUDGE_BASE_URL or OPENAI_BASE_URL).")
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="Judge model name (env MUKV_JUDGE_MODEL).")] = None,
    judge_key: Annotated[str | None, typer.Option(help="API key (env MUKV_JUDGE_API_KEY or OPENAI_API_KEY).")] = None,
    judge_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds per judge request attempt, in total (env MUKV_JUDGE_TIMEOUT; default 60)."),
    ] = None,
    cache: Annotated[Path | None, typer.Option(help="Judge cache file (default: RUN_DIR/judge_cache.jsonl).")] = None,
    no_judge: Annotated[bool, typer.Option("--no-judge", help="Judge-free metrics only.")] = False,
    judge_concurrency: Annotated[
        int,
        typer.Option(
            help="Judge requests in flight at once (rate limits are honoured: HTTP 429/503 Retry-After holds them all)."
        ),
    ] = 1,
) -> None:
    """Score a run: LLM judge for open-ended answers, accuracy for multiple choice, judge-free metrics."""
    import os

    from tqdm import tqdm

    from mukv.eval.judge import Judge, JudgeConfig
    from mukv.eval.scoring import score_run

    if judge_concurrency < 1:
        raise ValueError(f"--judge-concurrency: must be >= 1, got {judge_concurrency}")

    judge_client = None
    configured = judge_url or judge_model or os.environ.get("MUKV_JUDGE_BASE_URL") or os.environ.get("MUKV_JUDGE_MODEL")
    if not no_judge and configured:
        given = {"base_url": judge_url, "model": judge_model, "api_key": judge_key, "timeout": judge_timeout}
        overrides = {k: v for k, v in given.items() if v is not None and v != ""}
        judge_client = Judge(JudgeConfig.from_env(**overrides), cache or run_dir / "judge_cache.jsonl")
    elif not no_judge:
        typer.secho(
            "no judge endpoint configured (--judge-url/--judge-model or MUKV_JUDGE_BASE_URL/MUKV_JUDGE_MODEL): "
            "open-ended answers get judge-free metrics only",
            fg=typer.colors.YELLOW,
            err=True,
        )
    bars: list[tqdm] = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="answer", desc="judging", file=sys.stderr, dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        scores = score_run(run_dir, judge_client, concurrency=judge_concurrency, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    typer.echo(json.dumps(scores, indent=2))


@app.command()
@_user_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories to compare.")],
    out: Annotated[Path, typer.Option("--out", help="Where report.md and the plots go.")] = Path("report"),
    video: Annotated[str | None, typer.Option(help="Video for the retrieval plot (default: the first).")] = None,
) -> None:
    """Compare runs: a Markdown table (quality, memory, tokens, speed) and PNG plots."""
    from mukv.eval.report import write_report

    path = write_report(run_dirs, out, video)
    typer.echo(path.read_text())
    typer.echo(f"written to {path}")


@app.command()
@_user_errors
def serve(
    model: ModelOption = DEFAULT_MODEL_ID,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    host: Annotated[
        str, typer.Option(help="Address to listen on; any but a loopback one needs --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="MUKV_SERVE_TOKEN",
            show_default=False,
            help="Bearer token every /v1 and /metrics request must send (at least 16 characters).",
        ),
    ] = None,
    allow_dir: Annotated[
        list[Path] | None, typer.Option("--allow-dir", help="Directory whose files streams may play (repeatable).")
    ] = None,
    allow_scheme: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-scheme", help="URL scheme live sources may use (repeatable; default: rtsp(s), rtmp(s), srt)."
        ),
    ] = None,
    max_streams: Annotated[int, typer.Option(help="Streams open at once.")] = 8,
    max_body_mib: Annotated[float, typer.Option(help="Largest request body in MiB.")] = 32.0,
    max_frame_pixels: Annotated[int, typer.Option(help="Largest frame (width x height).")] = 3840 * 2160,
    stream_memory_mib: Annotated[
        int, typer.Option(help="Memory budget of one stream in MiB (then it takes no more frames).")
    ] = 8192,
    max_queued_frames: Annotated[
        int, typer.Option(help="Frames waiting to be encoded per stream; beyond, the oldest are dropped.")
    ] = 64,
    encode_batch_frames: Annotated[
        int, typer.Option(help="Frames encoded per device job (a question waits for at most one job).")
    ] = 8,
    method: Annotated[str, typer.Option("--method", help="Memory method of streams that name none.")] = "mukv",
    preset: PresetOption = None,
    fps: Annotated[float, typer.Option("--fps", help="Frames sampled per second of file and live sources.")] = 0.5,
    model_name: Annotated[
        str | None, typer.Option(help="Model id listed by /v1/models (default: the checkpoint's).")
    ] = None,
    memory_dir: Annotated[
        Path | None,
        typer.Option(
            "--memory-dir",
            help="Directory where POST /v1/streams/{id}/save saves streams; those saved there are reopened at start.",
        ),
    ] = None,
) -> None:
    """Serve the model over HTTP: streams, pushed frames, questions as Server-Sent Events, an
    OpenAI-compatible /v1/chat/completions, health checks and Prometheus metrics."""
    from mukv.serve.config import MIB, ServeConfig

    config = ServeConfig(
        model=model,
        model_name=model_name,
        device=device,
        dtype=dtype,
        host=host,
        port=port,
        token=token,
        max_streams=max_streams,
        max_body_bytes=int(max_body_mib * MIB),
        max_frame_pixels=max_frame_pixels,
        stream_memory_bytes=stream_memory_mib * MIB,
        max_queued_frames=max_queued_frames,
        encode_batch_frames=encode_batch_frames,
        allow_dirs=tuple(allow_dir or ()),
        **({"allowed_schemes": tuple(allow_scheme)} if allow_scheme else {}),
        default_method=method,
        default_preset=preset,
        default_fps=fps,
        memory_dir=memory_dir,
    )
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn
        import websockets  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the server needs its extra: pip install 'mukv[serve]' (missing: {exc.name})") from None
    from mukv.errors import ModelLoadError
    from mukv.serve.app import create_app
    from mukv.serve.ws import max_message_bytes

    # The server's own messages (model loaded, failures) as "info: ..." lines next to uvicorn's.
    serve_logger = logging.getLogger("mukv.serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    level, propagate = serve_logger.level, serve_logger.propagate
    serve_logger.addHandler(handler)
    serve_logger.setLevel(logging.INFO)
    serve_logger.propagate = False
    web_app = create_app(config)
    # A WebSocket message may hold one frame of --max-body-mib in base64: larger ones close the socket (1009).
    server = uvicorn.Server(
        uvicorn.Config(web_app, host=host, port=port, log_level="info", ws_max_size=max_message_bytes(config))
    )
    state = web_app.state.mukv
    state.on_load_error = lambda exc: setattr(server, "should_exit", True)
    typer.secho(f"loading {model} on {device}; serving on http://{host}:{port}", err=True, dim=True)
    try:
        server.run()
    finally:  # a program that runs the command in-process gets its logging back as it was
        serve_logger.removeHandler(handler)
        serve_logger.setLevel(level)
        serve_logger.propagate = propagate
    if state.load_error is not None:
        raise ModelLoadError(str(state.load_error))


@app.command("train-tiny")
@_user_errors
def train_tiny_command(
    out: Annotated[Path, typer.Argument(help="Where the trained checkpoint and training.json go.")],
    seed: Annotated[int, typer.Option(help="Seed of weights and data.")] = 0,
    stage0_steps: Annotated[int, typer.Option(help="Vision-tower pretraining steps.")] = 1500,
    stage1_steps: Annotated[int, typer.Option(help="Single-frame QA steps.")] = 1500,
    stage2_steps: Annotated[int, typer.Option(help="Clip-curriculum QA steps.")] = 3000,
    max_frames: Annotated[int, typer.Option(help="Longest training clip.")] = 24,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="OUT itself when it holds an unfinished run: continue it at the same step with the same data "
            "order (its own settings; other options are not used). Otherwise a saved checkpoint (OUT/stages/stage1, "
            "or a finished run): run stages 2 and 3 from its weights."
        ),
    ] = None,
    isolated_order: Annotated[
        bool, typer.Option(help="Also ask order questions in frame-isolated batches (unanswerable there).")
    ] = False,
    clip_targets: Annotated[int, typer.Option(help="Rare targets per stage-2 clip (1-3, one per kind).")] = 3,
    isolated_share: Annotated[float, typer.Option(help="Share of stage-2/3 batches laid out frame-isolated.")] = 0.5,
    placed_share: Annotated[
        float, typer.Option(help="Share of stage-2/3 batches of independently encoded, re-positioned frames.")
    ] = 0.0,
    stage3_steps: Annotated[int, typer.Option(help="Long/sparse/re-positioned context steps (0: no stage 3).")] = 0,
    long_frames: Annotated[int, typer.Option(help="Longest dense stage-3 clip (frames).")] = 256,
    sparse_frames: Annotated[int, typer.Option(help="Largest sparse stage-3 subset (frames).")] = 48,
    stage3_tokens: Annotated[int, typer.Option(help="Visual tokens per stage-3 batch.")] = 4096,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between saved training states (OUT/progress).")] = 100,
) -> None:
    """Train a tiny LLaVA-OneVision on synthetic streams (CPU: about an hour with the defaults).

    Resumable: the state is saved every --checkpoint-every steps and on Ctrl-C / SIGTERM; continue
    with `mukv train-tiny OUT --resume OUT`."""
    import torch

    from mukv.training.trainer import TrainConfig, TrainingInterrupted, load_progress, train_tiny

    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig(
        seed=seed,
        stage0_steps=stage0_steps,
        stage1_steps=stage1_steps,
        stage2_steps=stage2_steps,
        max_frames=max_frames,
        isolated_order=isolated_order,
        clip_targets=clip_targets,
        isolated_share=isolated_share,
        placed_share=placed_share,
        stage3_steps=stage3_steps,
        long_frames=long_frames,
        sparse_frames=sparse_frames,
        stage3_tokens=stage3_tokens,
        checkpoint_every=checkpoint_every,
    )
    saved = load_progress(resume) if resume is not None else None
    if saved is not None:
        typer.echo(f"continuing the unfinished run in {resume} at {saved['stage']} step {saved['step']}, its settings")
        config = None
    started = time.time()

    def report(stage: str, step: int, stats: dict) -> None:
        values = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        typer.echo(f"[{time.time() - started:7.0f}s] {stage} step {step}: {values}")

    try:
        record = train_tiny(out, config, report, resume=resume)
    except TrainingInterrupted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(130) from None
    typer.echo(json.dumps({k: record[k] for k in ("stage0_accuracy", "stage1_accuracy", "accuracy")}, indent=2))


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
