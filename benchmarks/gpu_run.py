"""The prepared GPU run (issue 13, item 5): every check and benchmark of a first GPU session, in one call.

    bash benchmarks/gpu.sh --output-dir "$OUT"        # on the device machine (benchmarks/gpu.sh says how to call it)
    python benchmarks/gpu_run.py --dry-run            # here: the same steps on the CPU, tiny, into a new temp folder

Five steps run one after another, each a process of its own with its own timeout, so that a
crash or a hang in one (a CUDA error poisons its process) leaves the others their turn:

| step | what | script |
|---|---|---|
| tests | (a) the kernel tests on CUDA; the deterministic backward twice, same bits | gpu_tests.py |
| kernels | (b) RoIAlign and the mask loss against torchvision at training shapes, fp32 and bf16 | gpu_kernels.py |
| training | (c) a training iteration of the R50-FPN preset against torchvision's, batch 2 and 8 | gpu_models.py training |
| inference | (d) inference latency, batch 1, fp32 and bf16 | gpu_models.py inference |
| shapes | (e) a two-minute shapes training through `mrcnn train`, and its AP | gpu_shapes.py |

Each step's timeout is its cap (`STEPS`), cut to what is left of `--budget` (all steps
together); a step left less than its minimum is skipped, and says so. The shapes step comes
last and takes what the others left, up to its cap. Everything the steps print goes to the
terminal and to `gpu_cuda.log`; each step writes `gpu_<step>_cuda.json` as it measures; at
the end this script writes `gpu_cuda.json` (the machine, the versions, the date, each step's
status, seconds and exit code) and `gpu_cuda.md` (every step's numbers as tables,
benchmarks/gpu_report.py). Seven result files and one log: what a device call brings back.

The whole run shares one Triton cache (`TRITON_CACHE_DIR`, a fresh folder unless set), so a
kernel compiled by the tests is not compiled again by the benchmarks. `--dry-run` runs the same
scripts on the CPU with tiny sizes and the kernels under Triton's interpreter
(`TRITON_INTERPRET=1`); it proves the run works end to end (tests/test_gpu_script.py), not
how fast anything is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "--dry-run" in sys.argv:  # before torch and the kernels are imported
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.gpu_common import ROOT, error_record, machine, nvidia_smi, run_command  # noqa: E402, I001
from benchmarks.gpu_report import render  # noqa: E402

RESERVE_S = 15  # kept back at the end: the summary, and the margin under the call's own limit


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    arguments: tuple[str, ...]  # after `python`; "{seconds}" becomes the step's timeout less `margin_s`
    cap_s: int  # the step's timeout at most
    minimum_s: int  # below this much time left, the step is skipped
    margin_s: int = 0  # what the step keeps back from "{seconds}": the tests' determinism check, the shapes' start-up


STEPS = (
    Step("tests", "(a) kernel tests on CUDA; deterministic backward twice", ("benchmarks/gpu_tests.py", "--pytest-seconds", "{seconds}"), 140, 40, 45),
    Step("kernels", "(b) RoIAlign and mask loss against torchvision", ("benchmarks/gpu_kernels.py",), 75, 30),
    Step("training", "(c) training iteration, ours and torchvision's", ("benchmarks/gpu_models.py", "training"), 100, 40),
    Step("inference", "(d) inference latency, batch 1", ("benchmarks/gpu_models.py", "inference"), 40, 20),
    Step("shapes", "(e) two-minute shapes training and its AP", ("benchmarks/gpu_shapes.py", "--seconds", "{seconds}"), 210, 80, 15),
)


class Tee:
    """Write to the terminal and to the log."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def environment(dry_run: bool, cache: Path) -> dict:
    """The steps' environment: the repository importable, unbuffered output, one Triton cache, the interpreter for a dry run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TRITON_CACHE_DIR", str(cache))
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even where there is a GPU
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the results go (default: benchmarks/results, or a new temp folder for --dry-run)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, kernels under Triton's interpreter")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 450; 900 for --dry-run)")
    parser.add_argument("--steps", nargs="*", choices=[step.name for step in STEPS], help="run only these steps")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or (Path(tempfile.mkdtemp(prefix="gpu_dry_run_")) if args.dry_run else ROOT / "benchmarks" / "results")
    output_dir.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (900 if args.dry_run else 450)
    cache = Path(os.environ.get("TRITON_CACHE_DIR") or tempfile.mkdtemp(prefix="triton_cache_"))
    env = environment(args.dry_run, cache)

    previous = sys.stdout, sys.stderr
    with (output_dir / "gpu_cuda.log").open("w") as log:
        sys.stdout, sys.stderr = Tee(previous[0], log), Tee(previous[1], log)
        try:
            return run_steps(args, output_dir, budget, env)
        finally:
            sys.stdout, sys.stderr = previous


def run_steps(args, output_dir: Path, budget: float, env: dict) -> int:
    """Each step within its timeout and the budget, then the summary and the page (module docstring)."""
    start = time.perf_counter()
    scale = 2 if args.dry_run else 1  # a shared CPU is slower than it should be: more room before a timeout
    device_args = ["--dry-run"] if args.dry_run else []
    print(f"prepared GPU run{' (dry run)' if args.dry_run else ''}: output {output_dir}, budget {budget:.0f} s, "
          f"TRITON_CACHE_DIR {env['TRITON_CACHE_DIR']}")  # fmt: skip
    if not args.dry_run:
        run_command(["nvidia-smi"], 20, env=env)
    record = {"dry_run": args.dry_run, "budget_s": budget, "output_dir": str(output_dir),
              "nvidia_smi_before": nvidia_smi("name,driver_version,memory.total,memory.used,clocks.sm,temperature.gpu,utilization.gpu"),
              "steps": {}}  # fmt: skip
    summary = output_dir / "gpu_cuda.json"
    summary.write_text(json.dumps(record, indent=2) + "\n")
    for step in STEPS:
        if args.steps and step.name not in args.steps:
            continue
        left = budget - (time.perf_counter() - start) - RESERVE_S
        timeout = min(step.cap_s * scale, left)
        status = {"what": step.what, "timeout_s": round(timeout)}
        if timeout < step.minimum_s:
            status["status"] = f"skipped: {left:.0f} s left, the step needs at least {step.minimum_s} s"
            print(f"=== {step.name}: {status['status']}")
        else:
            print(f"\n=== {step.name}: {step.what} (timeout {timeout:.0f} s, {left:.0f} s left of the budget)")
            arguments = [a.replace("{seconds}", str(int(timeout - step.margin_s))) for a in step.arguments]
            command = [sys.executable, *arguments, "--output-dir", str(output_dir), *device_args]
            run = run_command(command, timeout, env=env)
            status |= {"command": " ".join(["python", *arguments, *device_args]), "rc": run["rc"], "seconds": run["seconds"],
                       "status": "timed out" if run["timed_out"] else "ok" if run["rc"] == 0 else f"failed (exit code {run['rc']})"}  # fmt: skip
            print(f"=== {step.name}: {status['status']} in {run['seconds']:.0f} s")
        record["steps"][step.name] = status
        summary.write_text(json.dumps(record, indent=2) + "\n")

    try:
        record["machine"] = machine("cpu" if args.dry_run else "cuda")
    except Exception as error:  # noqa: BLE001 - a broken CUDA must not cost the summary
        record["machine"] = error_record(error)
    record["nvidia_smi_after"] = nvidia_smi("memory.used,clocks.sm,temperature.gpu,utilization.gpu")
    record["seconds"] = round(time.perf_counter() - start, 1)
    summary.write_text(json.dumps(record, indent=2) + "\n")
    try:
        page = render(output_dir)
    except Exception:  # noqa: BLE001 - the JSON files hold everything; say why the page is short
        page = "# Prepared GPU run\n\nThe page could not be rendered (the JSON files hold the results):\n\n```\n" + traceback.format_exc() + "```\n"
    (output_dir / "gpu_cuda.md").write_text(page)
    print("\n" + page)
    print(f"results in {output_dir}: " + ", ".join(sorted(p.name for p in output_dir.glob("gpu_*"))))
    failed = [name for name, status in record["steps"].items() if status["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
