"""Load ``mukv serve`` over loopback: concurrent push streams, questions over SSE, and checks that
nothing is lost or mixed between streams.

What it does
    Starts ``mukv serve`` in a subprocess on 127.0.0.1 (a free port, the shipped ``mukv-tiny`` by
    default, or ``--model``), exactly as a user runs it, and drives it over HTTP with ``httpx``:

    1. ``--streams`` push streams (8), each with its own synthetic content
       (:func:`mukv.video.streams.make_stream`, seed ``--seed + i``), push one PNG (or JPEG) frame
       every ``1 / --fps`` seconds (2 fps) for ``--duration`` seconds (60). Stream ``i`` uses its
       own timeline, ``t = i * TIMELINE_GAP_S + k / fps``, so a frame, answer or retrieved span of
       one stream found in another would sit outside that stream's timeline.
    2. Every ``--question-every`` seconds (10) per stream, staggered across streams, one question
       over Server-Sent Events (``POST /v1/streams/{id}/questions``): one of the stream's
       ground-truth questions whose evidence has been pushed (else the question is asked anyway,
       unscored). A stream's questions go one at a time: one that is still running delays the next,
       which may then be sent after the last frame. After the last frame, and once every queue has
       drained, each stream is asked all its ground-truth questions.
    3. Every ``--sample-every`` seconds: the server's RSS (``VmRSS`` of its process) and each
       stream's ``GET /v1/streams/{id}`` (frames received, encoded, queued, dropped; stream time
       and newest encoded time; memory bytes).

What it measures
    Time to first token and to the whole answer per question, on the client and as the server
    reports it (``server.first_token`` / ``server.total`` of the ``done`` event); push latency and
    how late pushes left against their schedule; frames sent / accepted / encoded / dropped per
    stream; encode lag (stream seconds between the newest frame received and the newest encoded,
    sampled); server RSS over time and each stream's memory bytes; answers that match the stream's
    ground truth (reported, not asserted); CPU seconds of server and client.

What it checks (any failure: exit status 1, the record is not added to the results)
    Every push was accepted; per stream, ``received`` equals the frames sent, ``encoded +
    dropped == received`` with nothing left queued, the drops equal the sum of the push
    responses' ``dropped``, the memory holds ``encoded`` frames, and the final answer's
    ``frames_seen`` equals sent minus dropped; ``/metrics`` agrees (per stream and in total);
    every answer's ``frames_seen`` never exceeds the frames that stream had pushed and never
    decreases, its ``time`` and every retrieved span lie on that stream's own timeline, before the
    answer's time, with frame indices below ``frames_seen``.

Bounds
    Every request has a timeout, the whole run a wall-clock ``--deadline`` and a cap on requests
    (``--max-requests``); the server is always stopped (SIGINT, then SIGKILL); loopback only.

Results
    ``OUT/serve.jsonl`` gets one record per run (settings, machine, load before and after, every
    question, per-stream counts, samples); ``OUT/serve.md`` is re-rendered from all records.

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_serve.py                                 # 8 streams x 2 fps x 60 s
    .venv/bin/python benchmarks/bench_serve.py --streams 2 --duration 15       # a short look
    .venv/bin/python benchmarks/bench_serve.py --render                        # re-render serve.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from common import (
    RESULTS,
    LoadMonitor,
    fmt,
    fmt_median_range,
    load_line,
    machine_info,
    machine_key,
    machine_lines,
    markdown_table,
    median_range,
    mib,
    text_table,
    wait_idle,
    write_results,
)
from mukv.video.streams import SyntheticStream, eval_kinds, make_stream

NAME = "serve"
# Seconds between the timelines of two streams: larger than any run, so timelines never overlap.
TIMELINE_GAP_S = 100_000.0
# A timestamp read back from the server is the float the client sent; allow for decimal round trips.
TIME_TOLERANCE = 1e-6
WARMUP_FRAMES = 8
WARMUP_SEED = 999


# --------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Load mukv serve over loopback: N push streams at R fps, questions over SSE, counts checked.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--streams", type=int, default=8, help="concurrent push streams")
    parser.add_argument("--fps", type=float, default=2.0, help="frames pushed per second per stream")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of pushing")
    parser.add_argument("--question-every", type=float, default=10.0, help="seconds between questions per stream")
    parser.add_argument("--max-new-tokens", type=int, default=6, help="decoding limit per question")
    parser.add_argument("--model", default="mukv-tiny", help="the served model (mukv serve --model)")
    parser.add_argument("--device", default="cpu", help="mukv serve --device")
    parser.add_argument("--dtype", default="auto", help="mukv serve --dtype")
    parser.add_argument("--method", default=None, help="memory method of the streams (default: the server's, mukv)")
    parser.add_argument("--max-queued-frames", type=int, default=None, help="mukv serve --max-queued-frames")
    parser.add_argument("--encode-batch-frames", type=int, default=None, help="mukv serve --encode-batch-frames")
    parser.add_argument("--image-format", choices=("png", "jpeg"), default="png", help="how frames are pushed")
    parser.add_argument("--frame-size", type=int, default=112, help="frame side in pixels (mukv-tiny: 112)")
    parser.add_argument("--seed", type=int, default=100, help="stream i's content is make_stream(seed=SEED + i)")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS / stream samples")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up stream before the measured ones")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds for the server to load")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per HTTP request")
    parser.add_argument("--question-timeout", type=float, default=120.0, help="seconds per question (whole answer)")
    parser.add_argument("--drain-timeout", type=float, default=300.0, help="seconds for the queues to drain")
    parser.add_argument("--deadline", type=float, default=None, help="wall-clock limit of the run in seconds")
    parser.add_argument("--max-requests", type=int, default=20_000, help="hard cap on HTTP requests")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="first wait up to this long for an idle CPU")
    parser.add_argument("--note", default=None, help="a remark recorded with the run (e.g. what else ran)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--render", action="store_true", help="only re-render OUT/serve.md, run nothing")
    args = parser.parse_args(argv)
    for name in ("streams", "max_new_tokens", "frame_size", "max_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    for name in ("fps", "duration", "question_every", "sample_every", "request_timeout", "question_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')}: must be > 0")
    if args.duration * args.fps < 2:
        parser.error("--duration x --fps: need at least 2 frames per stream")
    if args.duration >= TIMELINE_GAP_S:
        parser.error(f"--duration: must be under {TIMELINE_GAP_S:.0f} s (streams' timelines must not overlap)")
    if args.deadline is None:
        args.deadline = args.startup_timeout + args.duration + args.drain_timeout + 2 * args.question_timeout + 60
    planned = planned_requests(args)
    if planned > args.max_requests:
        parser.error(f"--max-requests {args.max_requests}: this load plans about {planned} requests")
    return args


def frames_per_stream(args: argparse.Namespace) -> int:
    return max(2, math.floor(args.duration * args.fps + 1e-9))


def question_times(args: argparse.Namespace, index: int) -> list[float]:
    """Seconds after the start at which stream ``index`` asks: every ``question_every`` seconds,
    the first after one interval (frames are in by then), staggered evenly across streams."""
    step = args.question_every
    first = step + index * step / args.streams
    return [first + j * step for j in range(int(args.duration // step) + 1) if first + j * step < args.duration]


def planned_requests(args: argparse.Namespace) -> int:
    """Requests a run plans to make (the cap must leave room for them)."""
    per_stream = frames_per_stream(args) + len(question_times(args, 0)) + 3 + 4  # final questions, create, info
    samples = math.ceil((args.duration + args.drain_timeout) / args.sample_every) * args.streams
    return args.streams * per_stream + samples + WARMUP_FRAMES + 16


# --------------------------------------------------------------------------- streams and budget


@dataclass
class StreamPlan:
    """One stream's content: frames (encoded images), their times on the stream's own timeline, and
    the ground-truth questions (evidence frame indices into this stream's frames)."""

    index: int
    seed: int
    offset: float
    clip: SyntheticStream
    images: list[bytes]
    timestamps: list[float]

    def frame_of(self, t: float, fps: float) -> int | None:
        """Index of the frame this stream sent at time ``t`` (``None``: not a time on its timeline)."""
        k = round((t - self.offset) * fps)
        if 0 <= k < len(self.timestamps) and abs(self.timestamps[k] - t) <= TIME_TOLERANCE:
            return k
        return None


@dataclass
class StreamRun:
    """What happened to one stream during the run (client side)."""

    plan: StreamPlan
    id: str = ""
    sent: int = 0  # pushes started (an upper bound on what the server can have received)
    accepted: int = 0
    push_dropped: int = 0  # the sum of the push responses' ``dropped``
    push_errors: list[str] = field(default_factory=list)
    push_latency: list[float] = field(default_factory=list)
    push_late: list[float] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    final_info: dict[str, Any] | None = None


class Stop(Exception):
    """The run hit its request cap or its deadline."""


class Budget:
    """The hard bounds of a run: at most ``cap`` requests and a wall-clock deadline."""

    def __init__(self, cap: int, seconds: float) -> None:
        self.cap = cap
        self.deadline = time.monotonic() + seconds
        self.used: Counter[str] = Counter()
        self.stopped: str | None = None

    def take(self, kind: str) -> None:
        if sum(self.used.values()) >= self.cap:
            self.stopped = self.stopped or f"request cap of {self.cap} reached"
            raise Stop(self.stopped)
        if self.remaining() <= 0:
            self.stopped = self.stopped or "deadline reached"
            raise Stop(self.stopped)
        self.used[kind] += 1

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, limit: float) -> float:
        """``limit``, cut to what is left of the deadline."""
        return max(0.1, min(limit, self.remaining()))


def encode_image(frame: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "PNG" if image_format == "png" else "JPEG", quality=95)
    return buffer.getvalue()


def build_plans(args: argparse.Namespace) -> list[StreamPlan]:
    """Every stream's synthetic content, encoded up front so that the client's work while loading
    the server is sending, not image encoding."""
    count = frames_per_stream(args)
    plans = []
    for index in range(args.streams):
        seed = args.seed + index
        clip = make_stream(count, seed=seed, size=args.frame_size, fps=args.fps, kinds=eval_kinds(seed))
        offset = index * TIMELINE_GAP_S
        plans.append(
            StreamPlan(
                index=index,
                seed=seed,
                offset=offset,
                clip=clip,
                images=[encode_image(frame, args.image_format) for frame in clip.frames],
                timestamps=[offset + float(t) for t in clip.timestamps],
            )
        )
    return plans


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mukv_command() -> list[str]:
    script = Path(sys.executable).parent / "mukv"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mukv.cli"]


def rss_bytes(pid: int) -> int | None:
    """Resident memory of process ``pid`` (``VmRSS``), else ``None``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_cpu_seconds() -> float:
    """CPU seconds of this process alone (the client), its children left out."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (``/proc/<pid>/stat``), else ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Server:
    """``mukv serve`` in a subprocess on a free loopback port; :meth:`stop` always ends it."""

    def __init__(self, args: argparse.Namespace, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.command = [
            *mukv_command(),
            "serve",
            "--model",
            args.model,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-streams",
            str(args.streams + 1),  # the warm-up stream is deleted first, but leave room anyway
        ]
        if args.max_queued_frames is not None:
            self.command += ["--max-queued-frames", str(args.max_queued_frames)]
        if args.encode_batch_frames is not None:
            self.command += ["--encode-batch-frames", str(args.encode_batch_frames)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Offline: the served model is local (mukv-tiny ships with the package); nothing is fetched.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with self.log.open("w") as output:
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ``/health/ready`` answered 200 (raises if the server exits or takes too long)."""
        assert self.process is not None
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=5, trust_env=False).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        """Stop the server as Ctrl-C does (uvicorn shuts down cleanly), killing it if it hangs."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


# --------------------------------------------------------------------------- load


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """n, p50, p95, min, max and mean of the values that are not ``None``."""
    clean = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if clean.size == 0:
        return {"n": 0, "p50": None, "p95": None, "min": None, "max": None, "mean": None}
    return {
        "n": int(clean.size),
        "p50": float(np.percentile(clean, 50)),
        "p95": float(np.percentile(clean, 95)),
        "min": float(clean.min()),
        "max": float(clean.max()),
        "mean": float(clean.mean()),
    }


def answered(answer: dict[str, Any]) -> bool:
    """Whether a question got its ``done`` event (neither failed nor timed out)."""
    return not answer["error"] and not answer["timed_out"]


def normalise(text: str | None) -> str:
    return (text or "").strip().strip(".").lower()


async def sleep_until(moment: float, budget: Budget) -> None:
    delay = moment - time.monotonic()
    if delay > budget.remaining():
        budget.stopped = budget.stopped or "deadline reached"
        raise Stop(budget.stopped)
    if delay > 0:
        await asyncio.sleep(delay)


async def push_frames(
    http: httpx.AsyncClient, run: StreamRun, args: argparse.Namespace, start: float, budget: Budget
) -> None:
    """Push this stream's frames one by one on schedule (late frames go out at once, in order:
    timestamps must increase, so a stream's pushes never overlap)."""
    media = "image/png" if args.image_format == "png" else "image/jpeg"
    for k, (image, t) in enumerate(zip(run.plan.images, run.plan.timestamps, strict=True)):
        due = start + k / args.fps
        await sleep_until(due, budget)
        budget.take("push")
        run.sent += 1
        sent = time.monotonic()
        run.push_late.append(max(0.0, sent - due))
        try:
            response = await http.post(
                f"/v1/streams/{run.id}/frames",
                params={"t": repr(t)},
                content=image,
                headers={"content-type": media},
                timeout=budget.timeout(args.request_timeout),
            )
        except httpx.HTTPError as exc:
            run.push_errors.append(f"frame {k}: {type(exc).__name__}: {exc}")
            continue
        run.push_latency.append(time.monotonic() - sent)
        if response.status_code != 202:
            run.push_errors.append(f"frame {k}: HTTP {response.status_code}: {response.text[:200]}")
            continue
        body = response.json()
        run.accepted += int(body["accepted"])
        run.push_dropped += int(body["dropped"])


async def ask(
    http: httpx.AsyncClient,
    run: StreamRun,
    question: str,
    expected: str | None,
    phase: str,
    args: argparse.Namespace,
    budget: Budget,
) -> dict[str, Any]:
    """One question over SSE; returns its record (``error`` set when it failed)."""
    budget.take("question")
    record: dict[str, Any] = {
        "stream": run.plan.index,
        "phase": phase,
        "question": question,
        "expected": expected,
        "sent_at_frames": run.sent,
        # Frames the server had accepted before the question was sent: its answer must see them all
        # unless they were dropped meanwhile.
        "accepted_before": run.accepted,
        "timed_out": False,
        "error": None,
    }
    body = {"question": question, "max_new_tokens": args.max_new_tokens}
    start = time.monotonic()
    first: float | None = None
    done: dict[str, Any] | None = None
    tokens: list[str] = []

    async def read() -> None:
        nonlocal first, done
        url = f"/v1/streams/{run.id}/questions"
        # The status line comes with the first event (a refused question is a JSON error), so the
        # first read may wait as long as the whole answer may take.
        timeout = budget.timeout(args.question_timeout)
        async with http.stream("POST", url, json=body, timeout=timeout) as response:
            if response.status_code != 200:
                record["error"] = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            event = None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if first is None:
                        first = time.monotonic() - start
                    data = json.loads(line[5:])
                    if event == "token":
                        tokens.append(data["text"])
                    elif event == "done":
                        done = data
                        return
                    else:
                        record["error"] = f"event {event}: {data}"
                        return

    try:
        await asyncio.wait_for(read(), timeout=budget.timeout(args.question_timeout))
    except asyncio.TimeoutError:
        # Not a failure of the accounting: an answer slower than --question-timeout is a measured
        # outcome (the client gives up, as a user would), counted and reported as such.
        record["timed_out"] = True
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["client_total"] = time.monotonic() - start
    record["client_first_token"] = first
    record["done_at_frames"] = run.sent
    record["done_at_time"] = run.plan.timestamps[run.sent - 1] if run.sent else None
    if done is None:
        if not record["timed_out"]:
            record["error"] = record["error"] or "no done event"
        return record
    record.update(
        answer=done["answer"],
        token_text="".join(tokens),
        correct=None if expected is None else normalise(done["answer"]) == normalise(expected),
        frames_seen=done["frames_seen"],
        frames_queued=done["frames_queued"],
        time=done["time"],
        method=done["method"],
        generated_tokens=done["generated_tokens"],
        context_tokens=done["context_tokens"],
        server_first_token=done["server"]["first_token"],
        server_total=done["server"]["total"],
        timings=done["timings"],
        retrieved=done["retrieved"],
        memory_bytes=done["memory"].get("total_bytes"),
        missed_before=max(0, record["accepted_before"] - done["frames_seen"]),
    )
    return record


def pick_question(plan: StreamPlan, pushed: int, j: int) -> tuple[str, str | None]:
    """The ``j``-th question of a stream with ``pushed`` frames sent: a ground-truth question whose
    evidence is among them (answer known), else one whose evidence is still to come (unscored)."""
    questions = plan.clip.questions
    ready = [q for q in questions if q.last_frame < pushed]
    if ready:
        chosen = ready[j % len(ready)]
        return chosen.question, chosen.answer
    return questions[j % len(questions)].question, None


async def ask_on_schedule(
    http: httpx.AsyncClient, run: StreamRun, args: argparse.Namespace, start: float, budget: Budget
) -> None:
    for j, offset in enumerate(question_times(args, run.plan.index)):
        await sleep_until(start + offset, budget)
        question, expected = pick_question(run.plan, run.sent, j)
        run.answers.append(await ask(http, run, question, expected, "live", args, budget))


async def sample(
    http: httpx.AsyncClient,
    runs: list[StreamRun],
    server: Server,
    args: argparse.Namespace,
    start: float,
    budget: Budget,
    rss: list[tuple[float, int]],
    done: asyncio.Event,
) -> None:
    """Every ``sample_every`` seconds: the server's RSS and each stream's counters, until ``done``."""

    async def one(run: StreamRun, at: float) -> None:
        budget.take("info")
        response = await http.get(f"/v1/streams/{run.id}", timeout=budget.timeout(args.request_timeout))
        if response.status_code != 200:
            return
        data = response.json()
        newest, encoded = data["time"], data["encoded_time"]
        run.samples.append(
            {
                "t": at,
                "frames": data["frames"],
                "time": newest,
                "encoded_time": encoded,
                # Seconds of stream time the memory is behind the newest frame received.
                "lag_seconds": 0.0
                if newest is None
                else newest - (encoded if encoded is not None else run.plan.offset),
                "memory_bytes": data["memory"]["total_bytes"],
            }
        )

    while not done.is_set():
        at = time.monotonic() - start
        value = rss_bytes(server.pid)
        if value is not None:
            rss.append((at, value))
        with contextlib.suppress(httpx.HTTPError):  # a missed sample is a gap in the series, not a failure
            await asyncio.gather(*(one(run, at) for run in runs))
        with contextlib.suppress(asyncio.TimeoutError):  # the next sample is due
            await asyncio.wait_for(done.wait(), timeout=args.sample_every)


async def stream_info(http: httpx.AsyncClient, run: StreamRun, args: argparse.Namespace, budget: Budget) -> dict:
    budget.take("info")
    response = await http.get(f"/v1/streams/{run.id}", timeout=budget.timeout(args.request_timeout))
    response.raise_for_status()
    return response.json()


async def drain(http: httpx.AsyncClient, runs: list[StreamRun], args: argparse.Namespace, budget: Budget) -> float:
    """Wait until no stream has frames queued or being encoded; returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < args.drain_timeout:
        infos = await asyncio.gather(*(stream_info(http, run, args, budget) for run in runs))
        if all(
            i["frames"]["queued"] == 0 and i["frames"]["encoding"] == 0 and i["answers"]["active"] == 0 for i in infos
        ):
            return time.monotonic() - start
        await asyncio.sleep(0.5)  # polls are requests too: keep them light next to the encoding
    raise Stop(f"queues and answers did not drain within {args.drain_timeout:.0f} s")


async def warm_up(http: httpx.AsyncClient, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """One throw-away stream: a few frames and a question, so the measured streams do not pay the
    model's first-call costs (a running server has paid them long ago)."""
    clip = make_stream(WARMUP_FRAMES, seed=WARMUP_SEED, size=args.frame_size, fps=args.fps)
    started = time.monotonic()
    budget.take("create")
    created = await http.post("/v1/streams", json=stream_body(args), timeout=budget.timeout(args.request_timeout))
    created.raise_for_status()
    stream_id = created.json()["id"]
    media = "image/png" if args.image_format == "png" else "image/jpeg"
    for frame, t in zip(clip.frames, clip.timestamps, strict=True):
        budget.take("push")
        pushed = await http.post(
            f"/v1/streams/{stream_id}/frames",
            params={"t": repr(float(t))},
            content=encode_image(frame, args.image_format),
            headers={"content-type": media},
            timeout=budget.timeout(args.request_timeout),
        )
        pushed.raise_for_status()
    plan = StreamPlan(-1, WARMUP_SEED, 0.0, clip, [], [float(t) for t in clip.timestamps])
    run = StreamRun(plan, id=stream_id, sent=WARMUP_FRAMES)
    answer = await ask(http, run, clip.questions[0].question, None, "warmup", args, budget)
    if answer["error"]:
        raise RuntimeError(f"warm-up question failed: {answer['error']}")
    info = await stream_info(http, run, args, budget)
    budget.take("delete")
    (await http.delete(f"/v1/streams/{stream_id}", timeout=budget.timeout(args.request_timeout))).raise_for_status()
    return {"seconds": time.monotonic() - started, "frames": WARMUP_FRAMES, "encoded": info["frames"]["encoded"]}


def stream_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"source": "push"} | ({"method": args.method} if args.method else {})


async def scrape_metrics(http: httpx.AsyncClient, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """The counters of ``/metrics`` the checks compare with the streams' own."""
    budget.take("metrics")
    text = (await http.get("/metrics", timeout=budget.timeout(args.request_timeout))).text
    ingested: dict[str, float] = {}
    dropped: dict[str, dict[str, float]] = {}
    total_ingested = None
    for line in text.splitlines():
        if match := re.fullmatch(r'mukv_stream_frames_ingested_total\{stream="([^"]+)"\} (\S+)', line):
            ingested[match[1]] = float(match[2])
        elif match := re.fullmatch(
            r'mukv_stream_frames_dropped_total\{reason="([^"]+)",stream="([^"]+)"\} (\S+)', line
        ):
            dropped.setdefault(match[2], {})[match[1]] = float(match[3])
        elif match := re.fullmatch(
            r'mukv_stream_frames_dropped_total\{stream="([^"]+)",reason="([^"]+)"\} (\S+)', line
        ):
            dropped.setdefault(match[1], {})[match[2]] = float(match[3])
        elif match := re.fullmatch(r"mukv_frames_ingested_total (\S+)", line):
            total_ingested = float(match[1])
    return {"stream_ingested": ingested, "stream_dropped": dropped, "frames_ingested_total": total_ingested}


async def drive(
    args: argparse.Namespace, server: Server, plans: list[StreamPlan], budget: Budget, rss: list[tuple[float, int]]
) -> dict[str, Any]:
    """The whole load against a ready server; returns what was observed."""
    limits = httpx.Limits(max_connections=3 * args.streams + 8, max_keepalive_connections=3 * args.streams + 8)
    observed: dict[str, Any] = {"warmup": None}
    async with httpx.AsyncClient(base_url=server.url, limits=limits, trust_env=False) as http:
        if not args.no_warmup:
            observed["warmup"] = await warm_up(http, args, budget)
        observed["rss_idle"] = rss_bytes(server.pid)
        runs = [StreamRun(plan) for plan in plans]
        for run in runs:
            budget.take("create")
            created = await http.post(
                "/v1/streams", json=stream_body(args), timeout=budget.timeout(args.request_timeout)
            )
            if created.status_code != 201:
                raise RuntimeError(
                    f"creating stream {run.plan.index} failed: HTTP {created.status_code} {created.text}"
                )
            run.id = created.json()["id"]
        start = time.monotonic() + 0.5
        observed["runs"] = runs
        sampling_done = asyncio.Event()
        sampler = asyncio.ensure_future(sample(http, runs, server, args, start, budget, rss, sampling_done))
        try:
            await asyncio.gather(
                *(push_frames(http, run, args, start, budget) for run in runs),
                *(ask_on_schedule(http, run, args, start, budget) for run in runs),
            )
            observed["load_seconds"] = time.monotonic() - start
            observed["drain_seconds"] = await drain(http, runs, args, budget)
            # After the last frame: every ground-truth question of every stream (its evidence is in).
            for run in runs:
                for question in run.plan.clip.questions:
                    run.answers.append(await ask(http, run, question.question, question.answer, "final", args, budget))
            for run in runs:
                run.final_info = await stream_info(http, run, args, budget)
            observed["metrics"] = await scrape_metrics(http, args, budget)
        finally:
            sampling_done.set()
            await asyncio.wait_for(sampler, timeout=args.request_timeout + 5)
    return observed


# --------------------------------------------------------------------------- checks


def check(observed: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Everything that must add up; each failure is one line naming the stream and the numbers."""
    failures: list[str] = []
    runs: list[StreamRun] = observed["runs"]
    warmup_encoded = (observed.get("warmup") or {}).get("encoded", 0)
    metrics = observed.get("metrics") or {}
    method = args.method or "mukv"
    for run in runs:
        name = f"stream {run.plan.index} ({run.id})"
        planned = len(run.plan.images)
        if run.sent != planned:
            failures.append(f"{name}: sent {run.sent} of {planned} frames")
        failures += [f"{name}: push failed: {error}" for error in run.push_errors]
        info = run.final_info
        if info is None:
            failures.append(f"{name}: no final info")
            continue
        frames = info["frames"]
        by_reason = frames["dropped_by_reason"]
        if frames["received"] != run.sent or run.accepted != run.sent:
            failures.append(f"{name}: received {frames['received']}, accepted {run.accepted}, sent {run.sent}")
        if frames["encoded"] + frames["dropped"] != frames["received"]:
            failures.append(
                f"{name}: encoded {frames['encoded']} + dropped {frames['dropped']} != received {frames['received']}"
            )
        if frames["queued"] or frames["encoding"]:
            failures.append(f"{name}: {frames['queued']} queued, {frames['encoding']} encoding after the drain")
        if sum(by_reason.values()) != frames["dropped"]:
            failures.append(f"{name}: drops by reason {by_reason} do not sum to {frames['dropped']}")
        if by_reason.get("queue_full", 0) != run.push_dropped:
            failures.append(
                f"{name}: queue_full drops {by_reason.get('queue_full', 0)} != {run.push_dropped} in the push responses"
            )
        if info["memory"]["frames"] != frames["encoded"]:
            failures.append(f"{name}: memory holds {info['memory']['frames']} frames, {frames['encoded']} encoded")
        if metrics:
            scraped = metrics["stream_ingested"].get(run.id)
            if scraped != frames["encoded"]:
                failures.append(f"{name}: /metrics says {scraped} ingested, the stream {frames['encoded']}")
            scraped_drops = sum(metrics["stream_dropped"].get(run.id, {}).values())
            if scraped_drops != frames["dropped"]:
                failures.append(f"{name}: /metrics says {scraped_drops} dropped, the stream {frames['dropped']}")
        failures += check_answers(run, name, method, args)
        finals = [a for a in run.answers if a["phase"] == "final" and answered(a)]
        expected_seen = run.sent - frames["dropped"]
        for answer in finals:
            if answer["frames_seen"] != expected_seen:
                failures.append(
                    f"{name}: final answer saw {answer['frames_seen']} frames, sent {run.sent} - dropped "
                    f"{frames['dropped']} = {expected_seen}"
                )
        # Every question the client sent ended on the server too (a timed-out one as cancelled, or
        # completed unheard), none still running, and every answer the client received was completed.
        outcomes = info["answers"]
        ended = outcomes["completed"] + outcomes["cancelled"] + outcomes["failed"]
        received = sum(1 for a in run.answers if answered(a))
        if outcomes["active"] or ended != len(run.answers) or outcomes["completed"] < received:
            failures.append(
                f"{name}: the server counts answers {outcomes}; the client asked {len(run.answers)}, "
                f"received {received}"
            )
    total = metrics.get("frames_ingested_total")
    encoded = sum(run.final_info["frames"]["encoded"] for run in runs if run.final_info)
    if metrics and total != encoded + warmup_encoded:
        failures.append(f"/metrics: {total} frames ingested in total, streams {encoded} + warm-up {warmup_encoded}")
    return failures


def check_answers(run: StreamRun, name: str, method: str, args: argparse.Namespace) -> list[str]:
    """An answer sees only its own stream: frames it had pushed, times and spans on its timeline."""
    failures = []
    previous_seen = 0
    plan = run.plan
    for n, answer in enumerate(run.answers):
        label = f"{name}, question {n} ({answer['phase']})"
        if answer["error"]:
            failures.append(f"{label}: {answer['error']}")
            continue
        if answer["timed_out"]:
            continue  # no done event to check; counted as timed out
        seen = answer["frames_seen"]
        if not previous_seen <= seen <= answer["done_at_frames"]:
            failures.append(
                f"{label}: frames_seen {seen}, the previous answer saw {previous_seen}, "
                f"{answer['done_at_frames']} frames pushed"
            )
        previous_seen = max(previous_seen, seen)
        if answer["method"] != method:
            failures.append(f"{label}: answered by {answer['method']}, the stream is {method}")
        t = answer["time"]
        if plan.frame_of(t, args.fps) is None or t > answer["done_at_time"] + TIME_TOLERANCE:
            failures.append(f"{label}: answer time {t} is not a frame this stream had pushed")
        if normalise(answer["token_text"]) != normalise(answer["answer"]):
            failures.append(f"{label}: tokens {answer['token_text']!r} != answer {answer['answer']!r}")
        for span in answer["retrieved"]:
            start_k, end_k = plan.frame_of(span["start_time"], args.fps), plan.frame_of(span["end_time"], args.fps)
            if (
                start_k is None
                or end_k is None
                or span["end_time"] > t + TIME_TOLERANCE
                or not 0 <= span["first_frame"] <= span["last_frame"] < seen
            ):
                failures.append(f"{label}: retrieved span {span} is not on this stream's timeline before {t}")
    return failures


# --------------------------------------------------------------------------- the record


def evidence_retrieved(plan: StreamPlan, answer: dict[str, Any], fps: float) -> bool | None:
    """Whether a retrieved span covers the evidence of a scored question (``None``: unscored)."""
    question = next((q for q in plan.clip.questions if q.question == answer["question"]), None)
    if question is None or answer.get("expected") is None or not answered(answer):
        return None
    for span in answer["retrieved"]:
        first, last = plan.frame_of(span["start_time"], fps), plan.frame_of(span["end_time"], fps)
        if first is not None and last is not None and first <= question.last_frame and question.first_frame <= last:
            return True
    return False


def accuracy(answers: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [a for a in answers if a.get("correct") is not None]
    correct = sum(1 for a in scored if a["correct"])
    hits = [a["evidence_retrieved"] for a in scored if a.get("evidence_retrieved") is not None]
    return {
        "asked": len(answers),
        "timed_out": sum(1 for a in answers if a.get("timed_out")),
        "scored": len(scored),
        "correct": correct,
        "rate": correct / len(scored) if scored else None,
        "evidence_retrieved_rate": sum(hits) / len(hits) if hits else None,
    }


def summarise(
    args: argparse.Namespace,
    observed: dict[str, Any],
    failures: list[str],
    rss: list[tuple[float, int]],
    server: dict[str, Any],
) -> dict[str, Any]:
    runs: list[StreamRun] = observed["runs"]
    answers = []
    for run in runs:
        for answer in run.answers:
            answer["evidence_retrieved"] = evidence_retrieved(run.plan, answer, args.fps)
            answers.append(answer)
    live = [a for a in answers if a["phase"] == "live"]
    lag = [s["lag_seconds"] for run in runs for s in run.samples]
    queued = [s["frames"]["queued"] for run in runs for s in run.samples]
    streams = []
    reasons: Counter[str] = Counter()
    for run in runs:
        info = run.final_info or {"frames": {}, "memory": {}}
        frames = info["frames"]
        reasons.update(frames.get("dropped_by_reason", {}))
        streams.append(
            {
                "index": run.plan.index,
                "id": run.id,
                "seed": run.plan.seed,
                "timeline_offset_s": run.plan.offset,
                "sent": run.sent,
                "accepted": run.accepted,
                "push_dropped": run.push_dropped,
                "push_errors": run.push_errors,
                "received": frames.get("received"),
                "encoded": frames.get("encoded"),
                "dropped": frames.get("dropped"),
                "dropped_by_reason": frames.get("dropped_by_reason"),
                "memory_frames": info["memory"].get("frames"),
                "memory_bytes": info["memory"].get("total_bytes"),
                "memory_bytes_peak": max((s["memory_bytes"] for s in run.samples), default=None),
                "lag_seconds": stats([s["lag_seconds"] for s in run.samples]),
                "queued_max": max((s["frames"]["queued"] for s in run.samples), default=None),
                "push_latency": stats(run.push_latency),
                "push_late": stats(run.push_late),
                "accuracy": accuracy(run.answers),
                "server_answers": (run.final_info or {}).get("answers"),
                "samples": run.samples,
                "ground_truth": [
                    {
                        "question": q.question,
                        "answer": q.answer,
                        "frames": [q.first_frame, q.last_frame],
                        "kind": q.kind,
                    }
                    for q in run.plan.clip.questions
                ],
            }
        )
    sent = sum(s["sent"] for s in streams)
    dropped = sum(s["dropped"] or 0 for s in streams)
    rss_values = [v for _, v in rss]
    return {
        "benchmark": NAME,
        "settings": {
            "streams": args.streams,
            "fps": args.fps,
            "duration_s": args.duration,
            "frames_per_stream": frames_per_stream(args),
            "question_every_s": args.question_every,
            "max_new_tokens": args.max_new_tokens,
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "method": args.method or "mukv (server default)",
            "max_queued_frames": args.max_queued_frames,
            "encode_batch_frames": args.encode_batch_frames,
            "image_format": args.image_format,
            "frame_size": args.frame_size,
            "seed": args.seed,
            "sample_every_s": args.sample_every,
            "warmup": not args.no_warmup,
            "request_timeout_s": args.request_timeout,
            "question_timeout_s": args.question_timeout,
            "deadline_s": args.deadline,
            "max_requests": args.max_requests,
            "timeline_gap_s": TIMELINE_GAP_S,
        },
        "note": args.note,
        "server": server,
        "warmup": observed.get("warmup"),
        "load_seconds": observed.get("load_seconds"),
        "drain_seconds": observed.get("drain_seconds"),
        "latency": {
            "client_first_token": stats([a.get("client_first_token") for a in answers if answered(a)]),
            "client_total": stats([a.get("client_total") for a in answers if answered(a)]),
            "server_first_token": stats([a.get("server_first_token") for a in answers if answered(a)]),
            "server_total": stats([a.get("server_total") for a in answers if answered(a)]),
            "live_client_first_token": stats([a.get("client_first_token") for a in live if answered(a)]),
            "live_client_total": stats([a.get("client_total") for a in live if answered(a)]),
            "push": stats([v for run in runs for v in run.push_latency]),
            "push_late": stats([v for run in runs for v in run.push_late]),
        },
        "frames": {
            "sent": sent,
            "accepted": sum(s["accepted"] for s in streams),
            "encoded": sum(s["encoded"] or 0 for s in streams),
            "dropped": dropped,
            "dropped_by_reason": {k: v for k, v in reasons.items() if v},
            "dropped_fraction": dropped / sent if sent else None,
        },
        "lag": {"seconds": stats(lag), "queued_frames": stats(queued)},
        "rss": {
            "ready": server.get("rss_ready"),
            "idle": observed.get("rss_idle"),
            "peak": max(rss_values) if rss_values else None,
            "end": rss_values[-1] if rss_values else None,
            "samples": [[round(t, 2), v] for t, v in rss],
        },
        "memory_bytes_per_stream": stats([s["memory_bytes"] for s in streams]),
        "answers": {
            "asked": len(answers),
            "answered": sum(1 for a in answers if answered(a)),
            "timed_out": sum(1 for a in answers if a["timed_out"]),
            "timeout_s": args.question_timeout,
            # Frames accepted before a question was sent that its answer did not see: dropped from
            # the queue (oldest first) before the question's turn came.
            "missing_frames": stats([a["missed_before"] for a in answers if answered(a)]),
            "with_missing_frames": sum(1 for a in answers if answered(a) and a["missed_before"] > 0),
            "from_empty_memory": sum(
                1 for a in answers if answered(a) and a["frames_seen"] == 0 and a["accepted_before"] > 0
            ),
        },
        "accuracy": {
            "all": accuracy(answers),
            "live": accuracy(live),
            "final": accuracy([a for a in answers if a["phase"] == "final"]),
        },
        "questions": answers,
        "streams": streams,
        "checks": {"passed": not failures, "failures": failures},
    }


# --------------------------------------------------------------------------- rendering


def secs(value: float | None) -> str:
    return fmt(value, 3)


def latency_rows(record: dict[str, Any]) -> list[list[str]]:
    labels = {
        "client_first_token": "first token, client (s)",
        "server_first_token": "first token, server (s)",
        "client_total": "whole answer, client (s)",
        "server_total": "whole answer, server (s)",
        "live_client_first_token": "first token, client, scheduled questions (s)",
        "live_client_total": "whole answer, client, scheduled questions (s)",
        "push": "push request (s)",
        "push_late": "push sent after its due time (s)",
    }
    rows = []
    for key, label in labels.items():
        s = record["latency"][key]
        rows.append([label, str(s["n"]), secs(s["p50"]), secs(s["p95"]), secs(s["min"]), secs(s["max"])])
    for key, label in (("seconds", "encode lag, stream s (sampled)"), ("queued_frames", "frames queued (sampled)")):
        s = record["lag"][key]
        rows.append([label, str(s["n"]), fmt(s["p50"], 2), fmt(s["p95"], 2), fmt(s["min"], 2), fmt(s["max"], 2)])
    return rows


def stream_rows(record: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in record["streams"]:
        acc = s["accuracy"]
        reasons = ", ".join(f"{k} {v}" for k, v in (s["dropped_by_reason"] or {}).items() if v) or "-"
        rows.append(
            [
                str(s["index"]),
                str(s["seed"]),
                str(s["sent"]),
                str(s["accepted"]),
                str(s["encoded"]),
                f"{s['dropped']} ({reasons})",
                fmt(s["lag_seconds"]["p95"], 2) + " / " + fmt(s["lag_seconds"]["max"], 2),
                mib(s["memory_bytes"]),
                f"{acc['correct']}/{acc['scored']} of {acc['asked']}",
            ]
        )
    return rows


def accuracy_text(acc: dict[str, Any]) -> str:
    if not acc["scored"]:
        return f"none scored of {acc['asked']}"
    hit = acc["evidence_retrieved_rate"]
    return (
        f"{acc['correct']}/{acc['scored']} = {acc['rate']:.2f} (of {acc['asked']} asked; evidence among the "
        f"retrieved spans {'n/a' if hit is None else f'{hit:.2f}'})"
    )


def section(record: dict[str, Any]) -> str:
    m, s = record["machine"], record["settings"]
    server, rss, frames = record["server"], record["rss"], record["frames"]
    reasons = ", ".join(f"{k} {v}" for k, v in frames["dropped_by_reason"].items()) or "none"
    lines = [
        f"## {m['date_utc']}: {s['streams']} streams x {fmt(s['fps'], 2)} fps x {fmt(s['duration_s'], 0)} s, "
        f"{s['model']} on {m['device_name']} ({m['device']})",
        "",
        *machine_lines(m),
        f"- load: {load_line(record['load'])}",
    ]
    if record.get("note"):
        lines.append(f"- note: {record['note']}")
    lines += [
        f"- server: `{' '.join(server['command'][1:])}`, ready in {server['startup_seconds']:.1f} s; "
        f"{fmt(server['cpu_seconds'], 1)} CPU s over the run "
        f"({fmt(server['cpu_fraction'] and 100 * server['cpu_fraction'], 0)}% of one core); "
        f"client {fmt(record['client_cpu_seconds'], 1)} CPU s",
        f"- streams: method {s['method']}, {s['frames_per_stream']} {s['image_format'].upper()} frames of "
        f"{s['frame_size']} px each, a question every {fmt(s['question_every_s'], 1)} s per stream (staggered) "
        f"with max_new_tokens={s['max_new_tokens']}, then every ground-truth question after the drain",
        f"- frames: {frames['sent']} sent, {frames['accepted']} accepted, {frames['encoded']} encoded, "
        f"{frames['dropped']} dropped ({reasons}; {fmt(100 * (frames['dropped_fraction'] or 0), 1)}%); "
        f"pushing and the scheduled questions took {fmt(record['load_seconds'], 1)} s, "
        f"the queues drained "
        f"{fmt(record['drain_seconds'], 1)} s later",
        f"- server RSS: {mib(rss['ready'])} when ready, {mib(rss['idle'])} before the streams, peak "
        f"{mib(rss['peak'])}, {mib(rss['end'])} at the end; memory per stream at the end "
        f"{mib(record['memory_bytes_per_stream']['p50'])} (median; {mib(record['memory_bytes_per_stream']['min'])}"
        f"-{mib(record['memory_bytes_per_stream']['max'])})",
        f"- answers matching the stream's ground truth: scheduled questions "
        f"{accuracy_text(record['accuracy']['live'])}; "
        f"after the drain {accuracy_text(record['accuracy']['final'])}",
        f"- questions: {answers_text(record['answers'])}",
        f"- checks: {'all counts add up' if record['checks']['passed'] else 'FAILED'}",
        "",
        markdown_table(("latency", "n", "p50", "p95", "min", "max"), latency_rows(record)),
        "",
        markdown_table(
            (
                "stream",
                "seed",
                "sent",
                "accepted",
                "encoded",
                "dropped",
                "lag p95 / max (s)",
                "memory",
                "correct",
            ),
            stream_rows(record),
        ),
        "",
    ]
    return "\n".join(lines) + "\n"


def answers_text(answers: dict[str, Any]) -> str:
    missing = answers["missing_frames"]
    return (
        f"{answers['asked']} asked, {answers['answered']} answered, {answers['timed_out']} gave up on after "
        f"{fmt(answers['timeout_s'], 0)} s; {answers['with_missing_frames']} answers lacked frames the server had "
        f"accepted before their question was sent (dropped from the queue, before or while the question waited; "
        f"at most {int(missing['max'] or 0)}), {answers['from_empty_memory']} of them answered from an empty memory"
    )


def config_key(record: dict[str, Any]) -> str:
    s = record["settings"]
    return (
        f"{machine_key(record['machine'])}: {s['model']}, {s['method']}, {s['streams']} streams x "
        f"{fmt(s['fps'], 2)} fps x {fmt(s['duration_s'], 0)} s, a question every {fmt(s['question_every_s'], 1)} s"
    )


def summary(records: list[dict[str, Any]]) -> str:
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(config_key(record), []).append(record)
    parts = []
    specs: list[tuple[str, Any, int, str]] = [
        ("first token, client, p50 (s)", lambda r: r["latency"]["client_first_token"]["p50"], 3, ""),
        ("first token, client, p95 (s)", lambda r: r["latency"]["client_first_token"]["p95"], 3, ""),
        ("first token, server, p50 (s)", lambda r: r["latency"]["server_first_token"]["p50"], 3, ""),
        ("whole answer, client, p50 (s)", lambda r: r["latency"]["client_total"]["p50"], 3, ""),
        ("whole answer, client, p95 (s)", lambda r: r["latency"]["client_total"]["p95"], 3, ""),
        ("whole answer, server, p50 (s)", lambda r: r["latency"]["server_total"]["p50"], 3, ""),
        ("push request, p50 (s)", lambda r: r["latency"]["push"]["p50"], 3, ""),
        ("frames dropped (% of sent)", lambda r: 100 * (r["frames"]["dropped_fraction"] or 0), 1, "%"),
        ("encode lag, p95 (stream s)", lambda r: r["lag"]["seconds"]["p95"], 2, ""),
        ("encode lag, max (stream s)", lambda r: r["lag"]["seconds"]["max"], 2, ""),
        ("server RSS, peak (MiB)", lambda r: (r["rss"]["peak"] or 0) / 2**20, 0, ""),
        (
            "server RSS, peak over idle (MiB)",
            lambda r: None if r["rss"]["idle"] is None else ((r["rss"]["peak"] or 0) - r["rss"]["idle"]) / 2**20,
            0,
            "",
        ),
        (
            "memory per stream at the end, median (MiB)",
            lambda r: (
                None if r["memory_bytes_per_stream"]["p50"] is None else r["memory_bytes_per_stream"]["p50"] / 2**20
            ),
            2,
            "",
        ),
        ("questions given up on after the timeout", lambda r: r["answers"]["timed_out"], 0, ""),
        (
            "answers lacking frames accepted before the question (dropped)",
            lambda r: r["answers"]["with_missing_frames"],
            0,
            "",
        ),
        ("answers right, scheduled questions", lambda r: r["accuracy"]["live"]["rate"], 2, ""),
        ("answers right after the drain", lambda r: r["accuracy"]["final"]["rate"], 2, ""),
        ("server CPU (% of one core)", lambda r: 100 * (r["server"]["cpu_fraction"] or 0), 0, "%"),
        ("other processes (% of the machine)", lambda r: 100 * (r["load"].get("other_cpu_fraction") or 0), 0, "%"),
        ("1-min load average at the start", lambda r: (r["load"].get("load_average_start") or [None])[0], 2, ""),
        ("1-min load average at the end", lambda r: (r["load"].get("load_average_end") or [None])[0], 2, ""),
    ]
    for key, group in groups.items():
        dates = ", ".join(r["machine"]["date_utc"] for r in group)
        rows = [
            [label, fmt_median_range(median_range(get(r) for r in group), digits, suffix)]
            for label, get, digits, suffix in specs
        ]
        parts += [f"### {key}", "", f"Runs: {dates}.", "", markdown_table(("", "median (range, runs)"), rows), ""]
    return "\n".join(parts) + "\n"


INTRO = (
    "# `mukv serve` under load on loopback\n\n"
    "Rendered by `benchmarks/bench_serve.py` from every record of `serve.jsonl`: a summary per machine and "
    "configuration (median, range and number of runs), then one section per run. Each run started `mukv serve` in "
    "a subprocess on 127.0.0.1, pushed every stream's own synthetic frames on its own timeline, asked questions "
    "over Server-Sent Events, and checked that every count adds up and that no answer saw another stream's frames "
    "(only runs whose checks passed are recorded). The client ran on the same machine as the server, so it shares "
    "the CPU; 'other processes' is what the rest of the machine used meanwhile. Encode lag is the stream time "
    "between the newest frame received and the newest encoded, sampled.\n\n"
)


def render(records: list[dict[str, Any]]) -> str:
    return INTRO + "## Summary\n\n" + summary(records) + "\n" + "".join(section(r) for r in records)


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Start the server, drive the load, stop the server (always); returns the record and failures."""
    monitor = LoadMonitor()
    from mukv.backends.registry import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    # The server resolves the dtype the same way (``auto``: float32 on a CPU).
    machine = machine_info(device, resolve_dtype(args.dtype, device))
    plans = build_plans(args)
    budget = Budget(args.max_requests, args.deadline)
    rss: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory(prefix="mukv-bench-serve-") as tmp:
        server = Server(args, Path(tmp) / "server.log")
        print(f"starting {' '.join(server.command)}", flush=True)
        server_info: dict[str, Any] = {"command": server.command}
        observed: dict[str, Any] = {"runs": []}
        client_cpu_start = process_cpu_seconds()
        wall_start = time.monotonic()
        try:
            server.start()
            server_info["startup_seconds"] = server.wait_ready(min(args.startup_timeout, budget.remaining()))
            server_info["rss_ready"] = rss_bytes(server.pid)
            print(f"server ready in {server_info['startup_seconds']:.1f} s (pid {server.pid})", flush=True)
            serve_cpu_start = cpu_seconds(server.pid)
            load_start = time.monotonic()
            try:
                observed = asyncio.run(
                    asyncio.wait_for(drive(args, server, plans, budget, rss), timeout=max(1.0, budget.remaining()))
                )
            except (Stop, asyncio.TimeoutError) as exc:
                raise RuntimeError(f"the run stopped early: {exc or budget.stopped or 'deadline reached'}") from None
            serve_cpu_end = cpu_seconds(server.pid)
            load_wall = time.monotonic() - load_start
            server_info["cpu_seconds"] = (
                None if serve_cpu_start is None or serve_cpu_end is None else serve_cpu_end - serve_cpu_start
            )
            server_info["cpu_fraction"] = (
                None if server_info["cpu_seconds"] is None else server_info["cpu_seconds"] / load_wall
            )
        except BaseException:
            print(f"server log (last lines):\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            server_info["returncode"] = server.stop()
        server_info["log_tail"] = server.log_tail(10)
    failures = check(observed, args)
    record = summarise(args, observed, failures, rss, server_info)
    record["machine"] = machine
    record["requests"] = dict(budget.used) | {"total": sum(budget.used.values())}
    record["wall_seconds"] = time.monotonic() - wall_start
    record["client_cpu_seconds"] = process_cpu_seconds() - client_cpu_start
    # The server was waited for above, so the load monitor counts its CPU as this run's own.
    record["load"] = monitor.report()
    return record, failures


def print_report(record: dict[str, Any]) -> None:
    print()
    print(text_table(("latency", "n", "p50", "p95", "min", "max"), latency_rows(record)))
    print()
    header = ("stream", "seed", "sent", "accepted", "encoded", "dropped", "lag p95/max", "memory", "correct")
    print(text_table(header, stream_rows(record)))
    print()
    frames, rss = record["frames"], record["rss"]
    print(
        f"frames: {frames['sent']} sent, {frames['encoded']} encoded, {frames['dropped']} dropped "
        f"{frames['dropped_by_reason'] or ''}"
    )
    print(
        f"server RSS: ready {mib(rss['ready'])}, idle {mib(rss['idle'])}, peak {mib(rss['peak'])}, "
        f"end {mib(rss['end'])}"
    )
    print(f"answers, scheduled questions: {accuracy_text(record['accuracy']['live'])}")
    print(f"answers after the drain: {accuracy_text(record['accuracy']['final'])}")
    print(f"questions: {answers_text(record['answers'])}")
    print(f"requests: {record['requests']}")
    print(load_line(record["load"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        write_results(args.out, NAME, [], render)
        print(f"re-rendered {args.out / (NAME + '.md')}")
        return 0
    if args.wait_idle > 0:
        waited, busy = wait_idle(args.wait_idle)
        print(f"waited {waited:.0f} s for an idle machine (last 5 s: {100 * (busy or 0):.0f}% busy)", flush=True)
    record, failures = run(args)
    print_report(record)
    if failures:
        # A run whose counts do not add up is not a result: keep it for inspection, outside the results.
        kept = Path(tempfile.mkstemp(prefix="serve-failed-", suffix=".json")[1])
        kept.write_text(json.dumps(record, indent=1))
        print(f"\nFAILED: {len(failures)} check(s) did not add up (record kept in {kept}):", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    jsonl, md = write_results(args.out, NAME, [record], render)
    print(f"\nall counts add up; appended to {jsonl}, re-rendered {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
