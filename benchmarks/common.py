"""What every benchmark script shares: machine and load records, the results writer, the
child-process helper, and table formatting.

- :func:`machine_info` and :class:`LoadMonitor` / :func:`load_line`: where a run ran and how busy
  the machine was with other work meanwhile (timings on a shared CPU are only comparable when
  that share is near zero); :func:`wait_idle` waits for a quiet machine.
- :func:`write_results`: appends records to ``OUT/<name>.jsonl`` and re-renders ``OUT/<name>.md``
  from *all* the records of that file, so the Markdown is never edited by hand nor appended to.
- :func:`run_child` / :func:`child_emitter`: run one part of a benchmark in a fresh process (peak
  memory of one part never leaks into another's) and collect the JSON records it emits.
- :func:`median_range`: the median and range of a number over recorded runs, as quoted in the
  READMEs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> str | None:
    """``git`` commit of the checkout, with ``+dirty`` when ``src/`` has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def command_line() -> str:
    executable = os.path.relpath(sys.executable)
    if executable.startswith(".."):
        executable = sys.executable
    return shlex.join([executable, *sys.argv])


def machine_info(device: Any = "cpu", dtype: Any = None, attn_implementation: str | None = None) -> dict[str, Any]:
    """Date, command, CPU, threads, versions, device and dtype of this run."""
    import torch
    import transformers

    import mukv

    device = torch.device(device)
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command_line(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mukv": mukv.__version__,
        "code": code_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "attn_implementation": attn_implementation,
    }


def machine_key(machine: dict[str, Any]) -> str:
    """What makes timings of two runs comparable: device name, device type and dtype."""
    return (
        f"{machine.get('device_name') or machine.get('cpu')} ({machine.get('device', 'cpu')}, {machine.get('dtype')})"
    )


# --------------------------------------------------------------------------- load


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have been busy since boot (Linux ``/proc/stat``, hypervisor steal
    included), else ``None``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def steal_cpu_seconds() -> float | None:
    """CPU seconds the hypervisor gave to other guests since boot (``/proc/stat``), else ``None``."""
    try:
        return int(Path("/proc/stat").read_text().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


class LoadMonitor:
    """How busy the machine was with other work from construction to :meth:`report`: this process
    and its waited-for children count as own; hypervisor steal counts as other and is also
    reported alone."""

    def __init__(self) -> None:
        self.start_wall = time.perf_counter()
        self.start_busy = busy_cpu_seconds()
        self.start_steal = steal_cpu_seconds()
        self.start_own = own_cpu_seconds()
        self.start_load = _loadavg()

    def report(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.start_wall
        busy = busy_cpu_seconds()
        own = own_cpu_seconds() - self.start_own
        other = None if busy is None or self.start_busy is None else max(0.0, busy - self.start_busy - own)
        steal = steal_cpu_seconds()
        cores = os.cpu_count() or 1
        return {
            "wall_seconds": wall,
            "own_cpu_seconds": own,
            "other_cpu_seconds": other,
            "other_cpu_fraction": None if other is None else other / (wall * cores),
            "steal_cpu_seconds": None if steal is None or self.start_steal is None else steal - self.start_steal,
            "load_average_start": self.start_load,
            "load_average_end": _loadavg(),
        }


def load_line(load: dict[str, Any]) -> str:
    other = load.get("other_cpu_seconds")
    line = f"run took {load['wall_seconds']:.1f} s wall, {load['own_cpu_seconds']:.1f} CPU s in this process"
    if other is not None:
        line += f"; other processes used {other:.1f} CPU s ({100 * load['other_cpu_fraction']:.0f}% of the machine)"
    if load.get("load_average_start") and load.get("load_average_end"):
        line += f"; 1-min load average {load['load_average_start'][0]:.2f} -> {load['load_average_end'][0]:.2f}"
    if load.get("steal_cpu_seconds") is not None:
        line += f"; steal {load['steal_cpu_seconds']:.1f} CPU s"
    return line


def other_share(load: dict[str, Any] | None) -> str:
    """``"other processes 3%"``, or ``""`` when not measured."""
    fraction = (load or {}).get("other_cpu_fraction")
    return "" if fraction is None else f"other processes {100 * fraction:.0f}%"


def wait_idle(limit: float, window: float = 5.0, threshold: float = 0.1) -> tuple[float, float | None]:
    """Wait (at most ``limit`` s) until the whole machine was under ``threshold`` busy over
    ``window`` s. Returns (seconds waited, busy fraction of the last window)."""
    start = time.perf_counter()
    cores = os.cpu_count() or 1
    busy = None
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(window)
        b1 = busy_cpu_seconds()
        if b0 is None or b1 is None:
            return time.perf_counter() - start, None
        busy = (b1 - b0) / (window * cores)
        if busy < threshold or time.perf_counter() - start >= limit:
            return time.perf_counter() - start, busy


# --------------------------------------------------------------------------- results


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a ``.jsonl`` file (a torn last line of an interrupted write is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def write_results(
    out: Path,
    name: str,
    records: Iterable[dict[str, Any]],
    render: Callable[[list[dict[str, Any]]], str] | None = None,
) -> tuple[Path, Path]:
    """Append ``records`` to ``out/name.jsonl``, then re-render ``out/name.md`` as
    ``render(all records of that file)`` (``render=None``: only append). Returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md = out / f"{name}.jsonl", out / f"{name}.md"
    records = list(records)
    if records:
        with jsonl.open("a") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    if render is not None:
        render_results(out, name, render)
    return jsonl, md


def render_results(out: Path, name: str, render: Callable[[list[dict[str, Any]]], str]) -> Path:
    """Re-render ``out/name.md`` from every record of ``out/name.jsonl``."""
    md = out / f"{name}.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(render(read_records(out / f"{name}.jsonl")))
    tmp.replace(md)
    return md


def median_range(values: Iterable[float | None]) -> tuple[float, float, float, int] | None:
    """``(median, min, max, n)`` of the values that are not ``None``; ``None`` if there are none."""
    clean = [v for v in values if v is not None]
    if not clean:
        return None
    return statistics.median(clean), min(clean), max(clean), len(clean)


def fmt_median_range(stat: tuple[float, float, float, int] | None, digits: int = 2, suffix: str = "") -> str:
    if stat is None:
        return "n/a"
    med, lo, hi, n = stat
    if n == 1:
        return f"{med:.{digits}f}{suffix} (1 run)"
    return f"{med:.{digits}f}{suffix} ({lo:.{digits}f}-{hi:.{digits}f}, {n} runs)"


# --------------------------------------------------------------------------- child processes


def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden options through which :func:`run_child` hands a child its task."""
    parser.add_argument("--child-task", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", default=None, help=argparse.SUPPRESS)


def child_task(args: argparse.Namespace) -> dict[str, Any] | None:
    """The task of a child process, or ``None`` in the parent."""
    return None if args.child_task is None else json.loads(args.child_task)


def child_emitter(args: argparse.Namespace) -> Callable[[dict[str, Any]], None]:
    """``emit(record)``: hand a JSON record to the parent (written at once, so that the records of a
    child that dies later are kept)."""
    path = Path(args.child_result)

    def emit(record: dict[str, Any]) -> None:
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    return emit


def run_child(script: str | Path, argv: Sequence[str], task: dict[str, Any], *, wait: float = 0.0) -> dict[str, Any]:
    """Run ``script argv`` in a fresh process with ``task`` (see :func:`child_task`); return
    ``{task, returncode, wall_seconds, load, records, error?}``, ``records`` being what the child
    emitted. ``wait`` > 0: first wait up to that long for an idle machine (:func:`wait_idle`)."""
    waited = busy = None
    if wait > 0:
        waited, busy = wait_idle(wait)
        print(f"  waited {waited:.0f} s for an idle machine (last 5 s: {100 * (busy or 0):.0f}% busy)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.jsonl"
        cmd = [sys.executable, str(Path(script).resolve()), *argv]
        cmd += ["--child-task", json.dumps(task), "--child-result", str(result)]
        monitor = LoadMonitor()
        proc = subprocess.run(cmd, check=False)
        load = monitor.report() | {"waited_idle_seconds": waited, "busy_before": busy}
        records = read_records(result)
    out: dict[str, Any] = {
        "task": task,
        "returncode": proc.returncode,
        "wall_seconds": load["wall_seconds"],
        "load": load,
        "records": records,
    }
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        out["error"] = f"child exited with {proc.returncode}{killed}"
        print(f"  {task}: {out['error']}", flush=True)
    return out


# --------------------------------------------------------------------------- formatting


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fx(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def machine_lines(m: dict[str, Any]) -> list[str]:
    """Markdown bullet lines for a run's :func:`machine_info`."""
    code = f", code {m['code']}" if m.get("code") else ""
    return [
        f"- command: `{m['command']}`",
        f"- CPU: {m['cpu']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']} "
        f"(interop {m['torch_interop_threads']})",
        f"- torch {m['torch']}, transformers {m['transformers']}, mukv {m['mukv']}{code}, Python {m['python']}"
        + (f", attention {m['attn_implementation']}" if m.get("attn_implementation") else ""),
    ]
