"""The prepared GPU run (benchmarks/gpu.sh, benchmarks/gpu_run.py) works before it ever meets a GPU.

The device call that runs it is short and rare, so a script that breaks there wastes it. The
dry run executes the same step scripts on the CPU with tiny sizes, the kernels under Triton's
interpreter, and must write the same files with the same keys; the quick tests check the parts
that the dry run cannot reach: the timeout that ends a whole process group, the JUnit reader,
the budget that skips steps, the page of a run with missing steps, and the documented device
call within the tool's limits.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_models, gpu_report, gpu_run, gpu_shapes, gpu_tests  # noqa: E402
from benchmarks.gpu_common import run_command  # noqa: E402

STEP_FILES = {"tests": "gpu_tests_cuda.json", "kernels": "gpu_kernels_cuda.json", "training": "gpu_training_cuda.json",
              "inference": "gpu_inference_cuda.json", "shapes": "gpu_shapes_cuda.json"}  # fmt: skip
MACHINE_KEYS = {"date", "device", "device_name", "versions", "step", "dry_run", "results"}
VERSION_KEYS = {"python", "torch", "triton", "torchvision", "pycocotools", "cuda", "cudnn", "driver"}


# --- the dry run, end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`bash benchmarks/gpu.sh --dry-run` into a temp folder: (exit code, seconds, folder)."""
    output = tmp_path_factory.mktemp("gpu_dry_run")
    start = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--output-dir", str(output)],
                          cwd=ROOT, env={**__import__("os").environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    return done.returncode, time.perf_counter() - start, output


@pytest.mark.slow
def test_dry_run_writes_every_file_a_device_call_brings_back(dry_run):
    _, _, output = dry_run
    names = sorted(p.name for p in output.iterdir())
    assert names == sorted(["gpu_cuda.json", "gpu_cuda.md", "gpu_cuda.log", *STEP_FILES.values()])
    assert len(names) <= 8  # what the device tool brings back from $OUT
    run = json.loads((output / "gpu_cuda.json").read_text())
    assert run["dry_run"] is True and set(run["steps"]) == set(STEP_FILES)
    assert VERSION_KEYS <= set(run["machine"]["versions"]) and run["machine"]["date"]
    for name, file in STEP_FILES.items():
        data = json.loads((output / file).read_text())
        assert MACHINE_KEYS <= set(data) and data["step"] == name and data["dry_run"] is True
        assert VERSION_KEYS <= set(data["versions"])
    page = (output / "gpu_cuda.md").read_text()
    for title in ("(a) Kernel tests", "(b) Kernels against torchvision", "(c) Training iteration", "(d) Inference latency", "(e) Shapes"):
        assert title in page
    log = (output / "gpu_cuda.log").read_text()
    assert all(f"=== {name}:" in log for name in STEP_FILES)


@pytest.mark.slow
def test_dry_run_measures_every_case(dry_run):
    _, _, output = dry_run
    load = lambda name: json.loads((output / STEP_FILES[name]).read_text())  # noqa: E731
    tests = load("tests")["results"]
    assert tests["pytest"]["counts"]["passed"] > 0
    assert {"box 7x7", "mask 14x14"} <= {key.split(" | ")[1] for key in tests if key.startswith("deterministic backward")}
    kernels = load("kernels")["results"]
    for head in ("box 7x7", "mask 14x14"):
        for dtype in ("fp32", "bf16"):
            assert f"roi_align | {head} | ours | {dtype}" in kernels
    assert any(key.startswith("mask_loss") and key.endswith("ours | bf16") for key in kernels)
    training, inference = load("training"), load("inference")
    assert {"training | batch 1 | fp32", "training | batch 1 | bf16"} <= set(training["results"])
    assert {"inference | batch 1 | fp32", "inference | batch 1 | bf16"} <= set(inference["results"])
    shapes = load("shapes")
    assert shapes["status"] in ("ok", "skipped: pycocotools missing")
    if shapes["status"] == "ok":
        assert {"AP", "AP50"} <= set(shapes["metrics"]["segm"]) and shapes["training"]["steps"] == 1


@pytest.mark.slow
def test_dry_run_passes_without_an_error(dry_run):
    """Every step ends well and no measurement raised: what the first GPU run should also show."""
    returncode, seconds, output = dry_run
    run = json.loads((output / "gpu_cuda.json").read_text())
    assert {name: step["status"] for name, step in run["steps"].items()} == dict.fromkeys(STEP_FILES, "ok")
    for file in STEP_FILES.values():
        results = json.loads((output / file).read_text())["results"]
        assert not [key for key, value in results.items() if isinstance(value, dict) and "error" in value], file
    assert returncode == 0
    assert seconds < 600


# --- the parts the dry run does not reach ----------------------------------------------------


def test_a_timeout_ends_the_whole_process_group():
    """A step's children (pytest's workers, data loaders) go with it: a grandchild's sleep does not outlive the timeout."""
    start = time.perf_counter()
    run = run_command(["bash", "-c", "sleep 30 & sleep 30; echo never"], timeout=1)
    assert run["timed_out"] and run["rc"] != 0 and "never" not in run["tail"]
    assert time.perf_counter() - start < 20


def test_a_missing_program_is_a_result_not_a_crash():
    run = run_command(["no-such-program-here"], timeout=5)
    assert run["rc"] is None and not run["timed_out"]


def test_junit_report_is_read_into_counts_failures_and_skips(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text("""<?xml version="1.0"?><testsuites><testsuite>
        <testcase classname="tests.kernels.a" name="ok" time="0.5"/>
        <testcase classname="tests.kernels.a" name="bad" time="2.0"><failure message="assert 1 == 2">trace</failure></testcase>
        <testcase classname="tests.kernels.a" name="broken" time="0.1"><error message="CUDA error"/></testcase>
        <testcase classname="tests.kernels.b" name="gpu" time="0"><skipped message="needs CUDA"/></testcase>
        <testcase classname="tests.kernels.b" name="gpu2" time="0"><skipped message="needs CUDA"/></testcase>
    </testsuite></testsuites>""")
    found = gpu_tests.read_junit(report)
    assert found["counts"] == {"passed": 1, "failed": 1, "errors": 1, "skipped": 2}
    assert [f["test"] for f in found["failures"]] == ["tests.kernels.a::bad", "tests.kernels.a::broken"]
    assert found["failures"][0]["message"] == "assert 1 == 2"
    assert found["skip_reasons"] == {"needs CUDA": 2}
    assert next(iter(found["slowest_s"])) == "tests.kernels.a::bad"


def test_a_spent_budget_skips_every_step_and_still_writes_the_summary(tmp_path):
    stdout = sys.stdout
    assert gpu_run.main(["--dry-run", "--budget", "20", "--output-dir", str(tmp_path)]) == 1
    assert sys.stdout is stdout  # given back after the run
    run = json.loads((tmp_path / "gpu_cuda.json").read_text())
    assert all(step["status"].startswith("skipped:") for step in run["steps"].values())
    page = (tmp_path / "gpu_cuda.md").read_text()
    assert page.count("No results:") == len(STEP_FILES)
    assert "skipped" in (tmp_path / "gpu_cuda.log").read_text()


def test_steps_fit_the_call():
    """The caps of the steps before the last fit inside the default budget with room for the shapes step's minimum."""
    *first, last = gpu_run.STEPS
    assert sum(step.cap_s for step in first) + last.minimum_s + gpu_run.RESERVE_S <= 450
    assert [step.name for step in gpu_run.STEPS] == list(STEP_FILES)


def test_the_documented_device_call_is_within_the_tool_limits():
    header = (ROOT / "benchmarks" / "gpu.sh").read_text()
    command = header.split('run(command="', 1)[1].split('"', 1)[0]
    timeout = int(header.split("timeout_s=", 1)[1].split(")", 1)[0])
    assert len(command) <= 2000 and timeout <= 480
    assert 'carry=[".whl"]' in header
    budget = float(command.split("--budget", 1)[1].split()[0])
    assert budget + 20 <= timeout
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")]).returncode == 0


def test_the_page_of_an_empty_folder_names_every_missing_step(tmp_path):
    page = gpu_report.render(tmp_path)
    assert all(f"gpu_{name}_cuda.json was not written" in page for name in STEP_FILES)


def test_without_pycocotools_the_shapes_step_says_it_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_shapes, "package_version", lambda name: None)
    assert gpu_shapes.main(["--dry-run", "--output-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "gpu_shapes_cuda.json").read_text())["status"] == "skipped: pycocotools missing"
    assert "skipped: pycocotools missing" in gpu_report.render(tmp_path)


def test_without_pycocotools_the_models_get_rectangles(monkeypatch):
    """mrcnn.data.shapes imports pycocotools; the model benchmarks must not need it."""
    import benchmarks.common

    def no_shapes(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'pycocotools'")

    monkeypatch.setattr(benchmarks.common, "benchmark_images", no_shapes)
    images, targets, source = gpu_models.make_images(2, 48, 64)
    assert source.startswith("plain rectangles") and "pycocotools" in source
    for image, target in zip(images, targets):
        assert image.shape == (3, 48, 64) and image.dtype == torch.float32
        boxes, masks = target["boxes"], target["masks"]
        assert masks.shape[1:] == (48, 64) and len(boxes) == len(masks) == len(target["labels"]) >= 2
        for box, mask in zip(boxes, masks):  # each box is its mask's extent
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
