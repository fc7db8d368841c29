"""torch.compile on inference: how many graph breaks, and compiled against eager time on a CPU.

    python benchmarks/compile.py                          # breaks of R50-FPN at 240 x 320; times of shapes_small and R50-FPN
    python benchmarks/compile.py --models shapes_small    # time the small model only (R50-FPN compiles for minutes)
    /work/main/.venv-tv/bin/python benchmarks/compile.py --breaks-only   # with torchvision: its breaks too
    python benchmarks/compile.py --quick                  # tiny sizes, seconds: proves the script works

**Graph breaks.** `torch._dynamo.explain(model)([image])` on the `torchvision_maskrcnn_resnet50_fpn`
preset in eval mode (random weights, one 240 x 320 image, which the preset resizes to 800 x 1066)
counts the graphs dynamo captures; a break is where one graph ends and eager Python takes over,
so breaks = graphs - 1 (dynamo's own count). The model's data-dependent steps are explicit
`torch.compiler.disable` boundaries: RoIAlign (`box_head.pool_rois`), the RPN's proposal selection
(`select_proposals`: top-k, NMS) and the box branch's (`postprocess_detections`: threshold, NMS).
A boundary inside a module's forward also ends the graphs of the callers around it (dynamo
resumes each frame in a graph of its own), which is why one boundary can cost more than one
break. Recorded per graph: its size in operations and where in the source it starts and ends;
per break, dynamo's reason where it gives one. With torchvision installed, its
`maskrcnn_resnet50_fpn` is counted the same way.

**Times.** `torch.compile(model)` (the default backend, inductor, which compiles C++ on a CPU)
against the eager model, on the same image: the first call, which compiles (into a fresh inductor
cache, as on a new machine), is timed alone;
then both are timed interleaved (benchmarks/common.py), the median of `--repeats` after a
warm-up, under `torch.no_grad()`. The same image every call: another image size, or another
number of proposals, compiles again (dynamo then marks those sizes dynamic). Models:
`shapes_small` on a 128 x 128 image and the R50-FPN preset on a 240 x 320 one (weights as in
benchmarks/inference.py: random, frozen norms calibrated, five detecting classes, so that the
mask branch runs on 100 detections). The compiled model's detections are compared with eager's.

Results: benchmarks/results/compile_cpu.json and .md (`--quick`: compile_cpu_quick.*;
`--breaks-only`: compile_breaks_cpu.*).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS, benchmark_images, interleaved, load_average, machine_record, model_pair, record_lines,
    torchvision_available, torchvision_maskrcnn, write_report,
)
from mrcnn.config import shapes_small, torchvision_maskrcnn_resnet50_fpn  # noqa: E402
from mrcnn.model import MaskRCNN  # noqa: E402

PRESETS = {"shapes_small": (shapes_small, (128, 128)), "r50_fpn": (torchvision_maskrcnn_resnet50_fpn, (240, 320))}
BREAKS_SIZE = (240, 320)
QUICK_SIZE = (64, 64)


def source_line(stack_trace: str | None) -> str:
    """The innermost `file:line (function)` of a node's or frame's stack trace."""
    frames = [line.strip() for line in (stack_trace or "").splitlines() if line.strip().startswith("File ")]
    if not frames:
        return "?"
    file, line, function = frames[-1].split(", ")[:3]  # 'File "/x/mrcnn/rpn.py"', 'line 134', 'in forward'
    return f"{Path(file[6:-1]).name}:{line.split()[-1]} ({function.removeprefix('in ')})"


def graph_breaks(model: torch.nn.Module, image: torch.Tensor) -> dict:
    """`torch._dynamo.explain` of one inference call: graphs, breaks, reasons, where each graph lies."""
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)([image])
    reasons = []
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})" if frame else "?"
        reasons.append({"reason": reason.reason.strip().splitlines()[0][:160], "where": where})
    graphs = []
    for graph in explanation.graphs:
        lines = [source_line(node.meta.get("stack_trace")) for node in graph.graph.nodes if node.meta.get("stack_trace")]
        ops = sum(node.op in ("call_function", "call_method", "call_module") for node in graph.graph.nodes)
        graphs.append({"ops": ops, "first": lines[0] if lines else "?", "last": lines[-1] if lines else "?"})
    torch._dynamo.reset()
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count, "reasons": reasons,
            "graph_spans": graphs}  # fmt: skip


def detections_difference(eager: dict, compiled: dict) -> dict:
    """Counts, whether the labels agree, and the largest box and score differences (rank by rank)."""
    same = len(eager["boxes"]) == len(compiled["boxes"])
    box = float((eager["boxes"] - compiled["boxes"]).abs().max()) if same and len(eager["boxes"]) else 0.0
    score = float((eager["scores"] - compiled["scores"]).abs().max()) if same and len(eager["scores"]) else 0.0
    return {"detections_eager": len(eager["boxes"]), "detections_compiled": len(compiled["boxes"]),
            "labels_equal": same and torch.equal(eager["labels"], compiled["labels"]), "max_box_difference": box,
            "max_score_difference": score}  # fmt: skip


def time_model(name: str, size: tuple[int, int], repeats: int) -> dict:
    """Compile time, then interleaved eager and compiled times of one preset on one image of `size`."""
    preset, _ = PRESETS[name]
    images, _ = benchmark_images(1, *size)
    model, _ = model_pair(preset(), images, with_torchvision=False)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        start = time.perf_counter()
        first = compiled(images)[0]
        compile_s = time.perf_counter() - start
        check = detections_difference(model(images)[0], first)
        times = interleaved({"eager": lambda: model(images), "compiled": lambda: compiled(images)}, repeats)
    for found in times.values():
        found["times_s"] = [round(t, 4) for t in found["times_s"]]
    print(f"{name} {size}: compile {compile_s:.1f} s, eager {times['eager']['median_s']:.3f} s, "
          f"compiled {times['compiled']['median_s']:.3f} s", flush=True)  # fmt: skip
    return {"size": list(size), "first_call_s": round(compile_s, 2), "results": times, "check": check,
            "speedup": times["eager"]["median_s"] / times["compiled"]["median_s"]}  # fmt: skip


def render(report: dict) -> str:
    lines = ["# torch.compile on inference (CPU)", "", *record_lines(report), ""]
    lines += [f"Graph breaks of one inference call, `torch._dynamo.explain`, {report['breaks_model']} in eval mode, "
              f"random weights, one {report['breaks_size'][0]} x {report['breaks_size'][1]} image"
              f"{' (resized to 800 x 1066 by both models)' if report['breaks_model'] != 'shapes_small' else ''}:", "",
              "| model | graphs | graph breaks |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {found['graphs']} | {found['graph_breaks']} |" for name, found in report["breaks"].items()]
    if "torchvision" not in report["breaks"]:
        lines += ["", "torchvision is not installed here: its row is absent (run with an environment that has it)."]
    for name, found in report["breaks"].items():
        lines += ["", f"Graphs of {name} (operations, first and last source line):", ""]
        lines += [f"{i}. {g['ops']} ops: {g['first']} ... {g['last']}" for i, g in enumerate(found["graph_spans"])]
        if found["reasons"]:
            lines += ["", f"Breaks dynamo gives a reason for ({name}):", ""]
            lines += [f"- `{r['where']}`: {r['reason']}" for r in found["reasons"]]
    if report.get("timings"):
        lines += ["", f"Seconds per inference call, median (best) of {report['repeats']} interleaved runs after one warm-up; "
                      "the first compiled call (compilation) timed alone:", "",
                  "| model | image | first compiled call s | eager s | compiled s | speedup | detections (eager, compiled) "
                  "| labels equal | largest box difference |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, found in report["timings"].items():
            eager, compiled, check = found["results"]["eager"], found["results"]["compiled"], found["check"]
            lines.append(f"| {name} | {found['size'][0]} x {found['size'][1]} | {found['first_call_s']:.1f} | "
                         f"{eager['median_s']:.3f} ({eager['best_s']:.3f}) | {compiled['median_s']:.3f} ({compiled['best_s']:.3f}) | "
                         f"{found['speedup']:.2f}x | {check['detections_eager']}, {check['detections_compiled']} | "
                         f"{check['labels_equal']} | {check['max_box_difference']:.2g} px |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(PRESETS), default=["shapes_small", "r50_fpn"], help="models to time")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds of each model (default 9)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--breaks-only", action="store_true", help="count the graph breaks, time nothing")
    parser.add_argument("--quick", action="store_true", help="shapes_small at 64 x 64 only, one repeat: proves the script works")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the results go (default benchmarks/results)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:  # inductor reads it when it first compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a fresh cache: the first call compiles all, as on a new machine
        return run(args)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {**machine_record("cpu"), "load_before": load_average(), "repeats": 1 if args.quick else args.repeats}

    breaks_size = QUICK_SIZE if args.quick else BREAKS_SIZE
    image = benchmark_images(1, *breaks_size)[0][0]
    torch.manual_seed(0)
    config = shapes_small() if args.quick else torchvision_maskrcnn_resnet50_fpn()
    report["breaks_size"], report["breaks_model"] = list(breaks_size), "shapes_small" if args.quick else "R50-FPN"
    report["breaks"] = {"ours": graph_breaks(MaskRCNN(config).eval(), image)}
    print(f"ours: {report['breaks']['ours']['graph_breaks']} graph breaks", flush=True)
    if torchvision_available() and not args.quick:
        torch.manual_seed(0)
        report["breaks"]["torchvision"] = graph_breaks(torchvision_maskrcnn().eval(), image)
        print(f"torchvision: {report['breaks']['torchvision']['graph_breaks']} graph breaks", flush=True)

    report["timings"] = {}
    if not args.breaks_only:
        models = ["shapes_small"] if args.quick else args.models
        for name in models:
            report["timings"][name] = time_model(name, QUICK_SIZE if args.quick else PRESETS[name][1], report["repeats"])
    report["load_after"] = load_average()
    stem = "compile_cpu_quick" if args.quick else "compile_breaks_cpu" if args.breaks_only else "compile_cpu"
    write_report(report, args.output_dir, stem, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
