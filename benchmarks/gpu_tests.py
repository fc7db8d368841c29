"""Step (a) of the prepared GPU run: the kernel tests on CUDA, and the deterministic backward run twice.

    python benchmarks/gpu_tests.py --output-dir DIR --pytest-seconds 120
    python benchmarks/gpu_tests.py --output-dir DIR --dry-run     # a few of the tests, Triton's interpreter

1. **The tests.** pytest on `tests/kernels` (every kernel against its readable reference: fp32,
   fp16 and bf16 cases as the tests have them; the deterministic backward's bits) and
   `tests/test_no_sync.py` (no host read in the pooler and the mask loss, under CUDA's sync
   debug mode where there is a GPU), in parallel with pytest-xdist where it is installed. Its
   JUnit XML is read back into the results: the counts, every failure and error with the start
   of its message, the skip reasons counted, the slowest tests. The dry run selects a few quick
   tests (`DRY_RUN_SELECTION`): it proves the plumbing, not the kernels.
2. **Two runs, the same bits.** RoIAlign's backward at training shapes (the box head's 1024
   RoIs at 7 x 7 and the mask head's 256 at 14 x 14, benchmarks/gpu_kernels.py's pyramid),
   through the model's pooler, fp32 and bf16 features: twice in torch's deterministic mode
   (kernels/roi_align_deterministic.py: the two gradients must be equal to the bit), twice with
   the atomic backward (on a GPU the order of the atomic additions varies, so they may differ;
   by how much is recorded), and the two backwards against each other.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import ROOT, Results, base_parser, choose_device, relative_error, run_command, time_ms  # noqa: E402, I001
from benchmarks.gpu_kernels import DTYPES, SIZES, STRIDES, deterministic, pyramid_and_rois  # noqa: E402

import torch  # noqa: E402

TEST_PATHS = ["tests/kernels", "tests/test_no_sync.py"]
DRY_RUN_SELECTION = "guard_sees_each_kind or test_empty_roi_set or test_bad_settings_raise or global_switch"


def pytest_command(junit: Path, dry_run: bool, workers: int) -> list[str]:
    """The pytest command line: quiet, no cache, JUnit XML, a per-test timeout and workers where the plugins are there."""
    command = [sys.executable, "-m", "pytest", *TEST_PATHS, "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if importlib.util.find_spec("pytest_timeout"):
        command.append("--timeout=120")
    if workers > 1 and importlib.util.find_spec("xdist"):
        command += ["-n", str(workers)]
    if dry_run:
        command += ["-k", DRY_RUN_SELECTION]
    return command


def read_junit(path: Path) -> dict:
    """Counts, failures and errors (with the start of their messages), skip reasons, the slowest tests."""
    cases = ElementTree.parse(path).getroot().iter("testcase")
    counts = collections.Counter()
    failures, skips, durations = [], collections.Counter(), []
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        durations.append((float(case.get("time") or 0), name))
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skips[(outcome.get("message") or "")[:160]] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            text = outcome.get("message") or (outcome.text or "")
            failures.append({"test": name, "kind": outcome.tag, "message": text.strip()[:500]})
    durations.sort(reverse=True)
    return {
        "counts": {key: counts[key] for key in ("passed", "failed", "errors", "skipped")},
        "failures": failures[:40],
        "skip_reasons": dict(skips.most_common(10)),
        "slowest_s": {name: round(seconds, 2) for seconds, name in durations[:8]},
    }


def run_tests(results: Results, dry_run: bool, seconds: float, workers: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "junit.xml"
        env = dict(os.environ)
        run = run_command(pytest_command(junit, dry_run, workers), seconds, env=env, cwd=ROOT)
        record = {"command": " ".join(["python", *pytest_command(Path("junit.xml"), dry_run, workers)[1:]]), **run}
        if junit.exists():
            record |= read_junit(junit)
        else:
            record["counts"] = None  # pytest did not get as far as writing its report (timeout, crash)
        results.add("pytest", record)


def backward_twice(pool, features: list, rois: torch.Tensor, grad_output: torch.Tensor, on: bool) -> tuple[list, list]:
    """The feature gradients of two backward passes with deterministic mode `on`."""
    runs = []
    with deterministic(on):
        for _ in range(2):
            leaves = [f.detach().clone().requires_grad_() for f in features]
            runs.append(torch.autograd.grad(pool(leaves, rois), leaves, grad_output))
    return runs


def same_bits(results: Results, device: str, sizes: dict) -> None:
    """Deterministic and atomic backward, each twice, fp32 and bf16, box and mask heads (module docstring)."""
    from mrcnn.poolers import MultiLevelRoIAlign

    features32, box_rois, mask_rois = pyramid_and_rois(device, sizes)
    for head, (rois, size) in {"box 7x7": (box_rois, 7), "mask 14x14": (mask_rois, 14)}.items():
        pooler = MultiLevelRoIAlign(size, STRIDES, sampling_ratio=2, aligned=False)

        def pool(features, rois, pooler=pooler):
            return pooler(features, rois, use_kernel=True)

        for dtype_name, dtype in DTYPES.items():
            features = [f.to(dtype) for f in features32]
            grad_output = torch.randn(rois.shape[0], sizes["channels"], size, size, generator=torch.Generator().manual_seed(3))
            grad_output = grad_output.to(device, dtype)

            def case(pool=pool, features=features, rois=rois, grad_output=grad_output):
                found, gradients = {}, {}
                for mode, on in (("deterministic", True), ("atomic", False)):
                    first, second = backward_twice(pool, features, rois, grad_output, on)
                    leaves = [f.detach().clone().requires_grad_() for f in features]
                    with deterministic(on):
                        out = pool(leaves, rois)
                        timing = time_ms(lambda: torch.autograd.grad(out, leaves, grad_output, retain_graph=True), device, sizes["repeats"],
                                         sizes["warmup"])  # fmt: skip
                    found[mode] = {
                        "two_runs_same_bits": all(torch.equal(a, b) for a, b in zip(first, second)),
                        "two_runs_max_abs_difference": max(float((a.float() - b.float()).abs().max()) for a, b in zip(first, second)),
                        "backward_ms": timing,
                    }
                    gradients[mode] = first
                found["deterministic_vs_atomic_relative_error"] = max(
                    relative_error(a, b) for a, b in zip(gradients["deterministic"], gradients["atomic"]))
                return found

            results.attempt(f"deterministic backward | {head} | {dtype_name}", case)


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--pytest-seconds", type=float, default=120, help="timeout of the pytest run")
    parser.add_argument("--workers", type=int, default=8, help="pytest-xdist workers (where it is installed)")
    args = parser.parse_args(argv)
    device = choose_device(args)
    results = Results(args.output_dir, "tests", "kernel tests on the device; the deterministic backward twice", args.dry_run, device)
    run_tests(results, args.dry_run, args.pytest_seconds, 1 if args.dry_run else args.workers)
    sizes = SIZES["dry" if args.dry_run else "gpu"] | {"repeats": 1 if args.dry_run else 10}
    same_bits(results, device, sizes)
    passed = results.data["results"]["pytest"].get("rc") == 0
    cases = [value for key, value in results.data["results"].items() if key.startswith("deterministic backward")]
    deterministic_ok = all("error" not in case and case["deterministic"]["two_runs_same_bits"] for case in cases)
    results["passed"] = {"pytest": passed, "deterministic_same_bits": deterministic_ok}
    return 0 if passed and deterministic_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
