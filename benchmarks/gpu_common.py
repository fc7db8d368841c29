"""What the steps of the prepared GPU run share (benchmarks/gpu_run.py): the record, the timer, the sizes.

- `machine`: the date, the device, and the versions a GPU result needs beside it (torch,
  Triton, torchvision, pycocotools, CUDA, cuDNN, the driver).
- `Results`: one step's JSON file, `gpu_<step>_cuda.json`, rewritten after every measurement,
  so that a step stopped by its timeout still leaves what it had measured. `attempt` runs one
  measurement and records an exception as `{"error": ...}` instead of ending the step: on a
  first GPU run one failing case should not hide the others.
- `time_ms`: milliseconds per call, the median and the best of `repeats` timed calls after
  `warmup` untimed ones. On CUDA each call is timed by a pair of CUDA events, and a 256 MiB
  buffer is overwritten before it so that the inputs do not sit in the 60 MB L2 cache from
  the call before (as `triton.testing.do_bench` does); on a CPU by the wall clock.
- `peak_memory`: `torch.cuda.max_memory_allocated` during one call, in MiB, in all and over
  what was allocated before the call (on a CPU: None).
- `--dry-run` runs every step on the CPU with tiny sizes; the Triton kernels then run under
  Triton's interpreter, which must be switched on before they are imported: importing this
  module with `--dry-run` among the arguments switches it on.

The step scripts import the library inside the measurement that needs it: on a first run a
broken import (a module renamed, an optional package missing) then costs that measurement,
recorded as its error, and not the whole step.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if "--dry-run" in sys.argv:  # before torch and the kernels are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

FLUSH_BYTES = 256 * 2**20  # several times the H200's 60 MB L2


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nvidia_smi(query: str) -> str | None:
    """One `nvidia-smi --query-gpu` field of the first GPU, or None where there is no nvidia-smi."""
    try:
        found = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip().splitlines()[0] if found.stdout.strip() else None


def machine(device: str) -> dict:
    """The date, the device and the versions (module docstring)."""
    cuda = device == "cuda"
    properties = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "device_memory_gib": round(properties.total_memory / 2**30, 1) if cuda else None,
        "multiprocessors": properties.multi_processor_count if cuda else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": package_version("triton"),
            "torchvision": package_version("torchvision"),
            "pycocotools": package_version("pycocotools"),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "driver": nvidia_smi("driver_version") if cuda else None,
        },
        "cpu_count": os.cpu_count(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR"),
    }


def error_record(error: BaseException) -> dict:
    """An exception as a result: its type and the start of its message."""
    return {"error": f"{type(error).__name__}: {str(error).strip()[:600]}"}


class Results:
    """One step's results, `<output_dir>/gpu_<step>_cuda.json`, saved after every change."""

    def __init__(self, output_dir: Path, step: str, what: str, dry_run: bool, device: str):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / f"gpu_{step}_cuda.json"
        self.data = {"step": step, "what": what, "dry_run": dry_run, **machine(device), "results": {}}
        self.save()

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def add(self, key: str, value) -> None:
        self.data["results"][key] = value
        self.save()

    def attempt(self, key: str, measure: Callable[[], object]):
        """`add(key, measure())`, or the exception as `{"error": ...}` (printed with its traceback)."""
        print(f"--- {self.data['step']}: {key}", flush=True)
        start = time.perf_counter()
        try:
            value = measure()
        except Exception as error:  # noqa: BLE001 - recorded, and the next measurement runs
            traceback.print_exc()
            value = error_record(error)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if isinstance(value, dict):
            value = value | {"wall_s": round(time.perf_counter() - start, 2)}
        self.add(key, value)
        print(json.dumps(value, default=str)[:400], flush=True)
        return value

    def save(self) -> None:
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(partial, self.path)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(run: Callable[[], object], device: str, repeats: int, warmup: int = 2,
            reset: Callable[[], None] | None = None) -> dict:  # fmt: skip
    """Median and best milliseconds of `run()` over `repeats` timed calls (module docstring).

    `reset()`, if given, runs before every call, untimed (for example: drop the gradients).
    """
    for _ in range(warmup):
        if reset:
            reset()
        run()
    synchronize(device)
    times = []
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda") if device == "cuda" else None
    for _ in range(repeats):
        if reset:
            reset()
        if device == "cuda":
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "best_ms": min(times), "repeats": repeats}


def peak_memory(run: Callable[[], object], device: str) -> dict:
    """Peak allocated memory during one `run()`, in MiB: in all, and over what was allocated before (None on a CPU)."""
    if device != "cuda":
        run()
        return {"peak_mib": None, "peak_extra_mib": None}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mib": round(peak / 2**20, 1), "peak_extra_mib": round((peak - before) / 2**20, 1)}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float64 (0 when both are zero)."""
    value, reference = value.detach().double(), reference.detach().double()
    norm = float(reference.norm())
    difference = float((value - reference).norm())
    return difference / norm if norm > 0 else difference


def run_command(command: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT, tail: int = 40) -> dict:
    """Run `command`, its output passed through to ours line by line, within `timeout` seconds.

    The command runs in a process group of its own, so that on timeout the whole group (pytest's
    workers, a data loader's processes) is ended: SIGTERM, then SIGKILL 10 s later. Returns
    `{"rc", "seconds", "timed_out", "tail"}`, `tail` the last lines of the output.
    """
    import collections
    import signal
    import threading

    start = time.perf_counter()
    print(f"$ {' '.join(command)}   (timeout {timeout:.0f} s)", flush=True)
    try:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", start_new_session=True)  # fmt: skip
    except OSError as error:  # no such program (nvidia-smi on a machine without one)
        print(f"!!! could not start {command[0]}: {error}", flush=True)
        return {"rc": None, "seconds": 0.0, "timed_out": False, "tail": [str(error)]}
    last = collections.deque(maxlen=tail)

    def copy():
        for line in process.stdout:
            print(line, end="", flush=True)
            last.append(line.rstrip("\n"))

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        print(f"!!! timeout after {timeout:.0f} s: ending process group {process.pid}", flush=True)
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    return {"rc": process.returncode, "seconds": round(time.perf_counter() - start, 1), "timed_out": timed_out, "tail": list(last)}


def base_parser(description: str):
    """The arguments every step takes: --output-dir, --dry-run, --device."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the kernels under Triton's interpreter")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one, cpu for --dry-run)")
    return parser


def choose_device(args) -> str:
    if args.device:
        return args.device
    return "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
