"""The page of a prepared GPU run: `gpu_cuda.md`, every step's numbers as tables, from the run's JSON files.

    python benchmarks/gpu_report.py DIR        # (re)write DIR/gpu_cuda.md from DIR/gpu_*_cuda.json

A step whose file is missing (it was skipped, or killed before it wrote anything) gets one
line saying so; a measurement that raised shows its error in place of its numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(output_dir: Path, name: str) -> dict | None:
    path = output_dir / f"gpu_{name}_cuda.json"
    return json.loads(path.read_text()) if path.exists() else None


def number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"
    return str(value)


def cell(key: str) -> str:
    """A results key ("roi_align | box 7x7 | ours | fp32") as a table cell."""
    return key.replace(" | ", ", ")


def errors(results: dict) -> list[str]:
    return [f"- {cell(key)}: `{value['error']}`" for key, value in results.items() if isinstance(value, dict) and "error" in value]


def header(output_dir: Path) -> list[str]:
    run = json.loads((output_dir / "gpu_cuda.json").read_text()) if (output_dir / "gpu_cuda.json").exists() else {}
    info = run.get("machine") or next((d for d in (load(output_dir, n) for n in ("tests", "kernels")) if d), {})
    versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
    lines = [f"# Prepared GPU run{' (dry run, CPU: proves the plumbing only)' if run.get('dry_run') else ''}: "
             f"{info.get('device_name', '?')}", "",
             f"- date: {info.get('date', '?')}; device memory {info.get('device_memory_gib')} GiB, "
             f"{info.get('multiprocessors')} SMs; {info.get('cpu_count')} CPUs",
             f"- versions: {versions}",
             f"- nvidia-smi before: {run.get('nvidia_smi_before')}; after: {run.get('nvidia_smi_after')}",
             f"- budget {run.get('budget_s')} s, the run took {run.get('seconds')} s", "",
             "| step | status | seconds | timeout s |", "|---|---|---|---|"]  # fmt: skip
    for name, step in run.get("steps", {}).items():
        lines.append(f"| {name}: {step['what']} | {step['status']} | {number(step.get('seconds'))} | {step['timeout_s']} |")
    return lines


def tests_section(data: dict) -> list[str]:
    results = data["results"]
    pytest = results.get("pytest", {})
    counts = pytest.get("counts")
    lines = ["", "## (a) Kernel tests on the device", "", f"`{pytest.get('command')}`: exit code {pytest.get('rc')}, "
             f"{pytest.get('seconds')} s{' (timed out)' if pytest.get('timed_out') else ''}; "
             + (", ".join(f"{v} {k}" for k, v in counts.items()) if counts else "no JUnit report (see the log)")]  # fmt: skip
    lines += [f"- FAILED {f['test']}: {f['message'][:200]!r}" for f in pytest.get("failures", [])[:20]]
    lines += [f"- skipped x{count}: {reason}" for reason, count in pytest.get("skip_reasons", {}).items()]
    lines += ["", "Deterministic backward (RoIAlign, model's pooler), two runs each:", "",
              "| head, dtype | deterministic: same bits | atomic: same bits | atomic: max diff | deterministic ms | atomic ms | deterministic vs atomic (rel.) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, case in results.items():
        if key.startswith("deterministic backward") and "error" not in case:
            d, a = case["deterministic"], case["atomic"]
            lines.append(f"| {cell(key.split(' | ', 1)[1])} | {number(d['two_runs_same_bits'])} | {number(a['two_runs_same_bits'])} "
                         f"| {number(a['two_runs_max_abs_difference'])} | {number(d['backward_ms']['median_ms'])} "
                         f"| {number(a['backward_ms']['median_ms'])} | {number(case['deterministic_vs_atomic_relative_error'])} |")  # fmt: skip
    return lines + errors(results)


def kernels_section(data: dict) -> list[str]:
    results = data["results"]
    lines = ["", "## (b) Kernels against torchvision", "", f"Sizes: {data.get('sizes')}; RoIs per level P2-P5: {data.get('rois_per_level_P2_P5')}."]
    if data.get("versions", {}).get("torchvision") is None:
        lines.append("torchvision is not installed here: its RoIAlign rows are skipped (its mask-loss formula is plain PyTorch and runs).")
    lines += ["",
             "| case | fw ms (best) | fw+bw ms (best) | peak MiB | peak extra MiB | loss / grad rel. error |", "|---|---|---|---|---|---|"]  # fmt: skip
    for key, value in results.items():
        if "fw" in value:
            errors_cell = (f"{number(value['loss_relative_error'])} / {number(value['grad_relative_error'])}"
                           if "loss_relative_error" in value else "")  # fmt: skip
            lines.append(f"| {cell(key)} | {number(value['fw']['median_ms'])} ({number(value['fw']['best_ms'])}) "
                         f"| {number(value['fw+bw']['median_ms'])} ({number(value['fw+bw']['best_ms'])}) "
                         f"| {number(value['peak_mib'])} | {number(value['peak_extra_mib'])} | {errors_cell} |")  # fmt: skip
    for key, value in results.items():
        if key.endswith("agreement") and "error" not in value:
            lines += [f"- {cell(key)}: " + "; ".join(f"{pair}: forward {number(v['forward'])}, backward {number(v['backward'])}"
                                              for pair, v in value.items() if isinstance(v, dict))]  # fmt: skip
        if key.endswith("bandwidth floor") and "error" not in value:
            lines += [f"- {cell(key)} (4.3 TB/s): " + "; ".join(f"{dtype} fw {number(v['fw_ms'])} ms, fw+bw {number(v['fw+bw_ms'])} ms"
                                                       for dtype, v in value.items() if isinstance(v, dict))]  # fmt: skip
    return lines + errors(results)


def models_section(data: dict, title: str, per: str) -> list[str]:
    results = data["results"]
    lines = ["", title, "", f"Preset {data.get('preset')}; images {data.get('images')}; models {data.get('models')}."]
    if data.get("versions", {}).get("torchvision") is None:
        lines.append("torchvision is not installed here: its rows are skipped.")
    if data.get("setup_error"):
        lines.append(f"- set-up failed: `{data['setup_error']}`")
    lines += ["", f"| case | model | s per {per}, median (best) | images/s | peak MiB | first call s (compiles) | first call |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, value in results.items():
        for model, found in value.items():
            if isinstance(found, dict) and "median_s" in found:
                first = ", ".join(f"{k} {number(v, 4)}" for k, v in found["first_call"].items())
                lines.append(f"| {cell(key)} | {model} | {found['median_s']:.4f} ({found['best_s']:.4f}) | {found['images_per_s']:.2f} "
                             f"| {number(found['peak_mib'])} | {found['first_call_s']:.2f} | {first} |")  # fmt: skip
        if "ours" in value and "torchvision" in value and "median_s" in value["ours"] and "median_s" in value["torchvision"]:
            lines.append(f"| {cell(key)} | ours / torchvision | {value['ours']['median_s'] / value['torchvision']['median_s']:.2f}x | | | | |")
    agreement = results.get("inference | agreement with torchvision")
    if agreement and "error" not in agreement:
        lines += ["", "Our detections against torchvision's (paired by label and nearest box; found: within a pixel):"]
        lines += [f"- {dtype}: {a['found_in_torchvision']} of {a['of']} found; largest differences: boxes {number(a['max_abs_difference_boxes'])} px, "
                  f"scores {number(a['max_abs_difference_scores'])}, pasted masks {number(a['max_abs_difference_masks'])}"
                  for dtype, a in agreement.items() if isinstance(a, dict)]  # fmt: skip
    return lines + errors(results)


def shapes_section(data: dict) -> list[str]:
    lines = ["", "## (e) Shapes training through `mrcnn train`, and its AP", "", f"Status: **{data.get('status', 'unfinished')}**."]
    for name, command in (data.get("commands") or {}).items():
        lines.append(f"- `{command['command']}`: exit code {command['rc']}, {command['seconds']} s" + (" (timed out)" if command["timed_out"] else ""))
    if data.get("plan"):
        lines.append(f"- plan: {data['plan']}")
    if data.get("training"):
        t = data["training"]
        lines.append(f"- training: {t['steps']} steps in {number(t['seconds'])} s, {number(t['images_per_s'])} images/s, last losses {t['last']}")
    metrics = data.get("metrics")
    if metrics:
        lines += ["", "| | AP | AP50 | AP75 |", "|---|---|---|---|"]
        lines += [f"| {name} | {100 * m['AP']:.1f} | {100 * m['AP50']:.1f} | {100 * m['AP75']:.1f} |" for name, m in (("mask", metrics["segm"]), ("box", metrics["bbox"]))]
    return lines


def render(output_dir: Path) -> str:
    lines = header(output_dir)
    sections = (("tests", tests_section), ("kernels", kernels_section),
                ("training", lambda d: models_section(d, "## (c) Training iteration, ours and torchvision's", "iteration")),
                ("inference", lambda d: models_section(d, "## (d) Inference latency, batch 1", "image")),
                ("shapes", shapes_section))  # fmt: skip
    for name, section in sections:
        data = load(output_dir, name)
        lines += section(data) if data else ["", f"## {name}", "", f"No results: gpu_{name}_cuda.json was not written (see gpu_cuda.log)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    (directory / "gpu_cuda.md").write_text(render(directory))
    print((directory / "gpu_cuda.md").read_text())
