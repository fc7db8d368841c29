"""Fine-tuning against training from scratch: does a model pretrained on the shapes learn a new task
faster, from 100 images? (The paper's models start from ImageNet, section 3.1; this is the same bet
in miniature, with `mrcnn.weights.load_pretrained`.)

**Pretraining.** The demo's model (`shapes_small`, `mrcnn/demo.py`'s recipe: SGD, lr 0.02, batch 4,
linear warm-up of 100 steps, gradient clipping at 10, the rate divided by 10 at 3/4 of the run)
on the synthetic shapes of `mrcnn/data/shapes.py` (circles, squares, triangles, stars: K = 5 with
the background), once, with seed 0. The demo trains 1500 steps; the default here is 800, to keep
the whole experiment within about half an hour of a loaded 2-core CPU (load 5 to 7, where a step of
4 images takes 1.3 s with one thread). It is scored on held-out
shapes, so the record says how good the starting point was.

**The new task.** The stick figures of `mrcnn/data/keypoints.py` as one class, "figure", with
their masks (the keypoints are ignored): thin articulated limbs instead of solid convex shapes,
K = 2 instead of 5. `--num-train` (100) training images, `--num-val` (100) held-out ones, drawn
once into the output folder in COCO's layout and read with `CocoDataset`, as a user's data would be.

**The two arms**, both `shapes_small(num_classes=2)` trained with the same settings (SGD, lr 0.01
for batch 2 by the linear scaling rule, a warm-up of 50 steps, then a constant rate, gradient
clipping at 10, horizontal flips):

- `fine_tuned`: the model built with seed s, then `load_pretrained(model, pretrained checkpoint)`,
  which loads every tensor that fits and keeps the fresh initialization of the class-specific
  layers (the box predictor's class scores and deltas and the mask predictor's last layer, whose
  shapes depend on K); the record names them;
- `from_scratch`: the model built with seed s, nothing loaded.

The seed s sets the fresh weights, the data order and the RoI sampling; the pretrained model is
the same for every seed. Each run is scored with COCO's mask and box AP on the held-out figures
after each of `--steps` (50, 100, 200, 400) optimizer steps. With a constant rate after the
warm-up, the model after 100 steps of a 400-step run is exactly a 100-step run, so one run gives
the whole curve: it trains to 50 steps, is scored, resumes to 100 (mrcnn/train.py makes a resumed
run equal to an uninterrupted one), and so on.

    python experiments/transfer.py                   # everything (about 25 minutes on 2 loaded cores)
    python experiments/transfer.py --seeds 0         # one seed of each arm
    python experiments/transfer.py --summarize-only  # the results from the finished runs

Every run writes `OUTPUT/runs/ARM/seed_S/result.json` after each scored point and marks it
finished after the last; a finished run with the same settings is skipped, an unfinished one
resumes from its last point (or its last checkpoint), so an interrupted call picks up where it
stopped. The summary writes `experiments/results/transfer.json` and `transfer.md`: the command,
machine, load, torch version, code commit, settings, every seed's curve, and per step the mean
and sample standard deviation over the seeds and the paired (same-seed) difference.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import code_version, conditions, spread  # noqa: E402  (the sibling experiment's helpers: one definition each)

ARMS = {
    "fine_tuned": "pretrained on the shapes, loaded with load_pretrained (class layers re-initialised)",
    "from_scratch": "the same model, randomly initialised",
}
RECORD_NAME = "result.json"
PRETRAIN_CATEGORY_NAMES = ["__background__", "circle", "square", "triangle", "star"]


# ---------------------------------------------------------------------------------------------
# Settings and records


def pretrain_settings(args: argparse.Namespace) -> dict:
    """What the pretrained model depends on; a pretraining record with other settings is stale."""
    return {"iterations": args.pretrain_iterations, "batch_size": args.pretrain_batch_size, "lr": args.pretrain_lr,
            "warmup": args.pretrain_warmup, "clip_grad_norm": 10.0, "decay_at": 0.75, "seed": 0,
            "num_train": args.num_pretrain_train, "num_val": args.num_pretrain_val, "data_seed": args.data_seed}  # fmt: skip


def run_settings(args: argparse.Namespace, arm: str) -> dict:
    """What a run of `arm` depends on besides its seed: the fine-tuned arm, on the pretraining's too."""
    settings = {"steps": sorted(args.steps), "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
                "clip_grad_norm": 10.0, "decay": None, "flip": True, "num_train": args.num_train,
                "num_val": args.num_val, "data_seed": args.data_seed}  # fmt: skip
    return {**settings, "pretrain": pretrain_settings(args)} if arm == "fine_tuned" else settings


def record_path(output_dir: Path, arm: str, seed: int) -> Path:
    return output_dir / "runs" / arm / f"seed_{seed}" / RECORD_NAME


def pretrain_record_path(output_dir: Path) -> Path:
    return output_dir / "pretrain" / RECORD_NAME


def read_record(path: Path, settings: dict) -> dict | None:
    """The record at `path` if it was written with these settings (finished or not), else None."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write: start again
    return record if record.get("settings") == settings else None


def finished(path: Path, settings: dict) -> dict | None:
    """The record at `path` if it is finished and was written with these settings, else None."""
    record = read_record(path, settings)
    return record if record is not None and record.get("finished") else None


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(path)  # atomic: a record is either whole or absent


# ---------------------------------------------------------------------------------------------
# The data


def prepare_data(args: argparse.Namespace) -> None:
    """Draw the shapes (pretraining) and the figures (the new task) into the output folder, once."""
    from mrcnn.data.keypoints import generate_figures
    from mrcnn.data.shapes import generate_shapes

    generate_shapes(args.output_dir / "shapes", args.num_pretrain_train, args.num_pretrain_val, seed=args.data_seed)
    figures, manifest = args.output_dir / "figures", args.output_dir / "figures" / "figures.json"
    drawn = {"num_train": args.num_train, "num_val": args.num_val, "seed": args.data_seed}
    if not (manifest.is_file() and json.loads(manifest.read_text()) == drawn):
        generate_figures(figures, args.num_train, args.num_val, seed=args.data_seed)  # redraws every file
        manifest.write_text(json.dumps(drawn))


def figures_datasets(output_dir: Path):
    """The new task as a user's data: COCO files read by `CocoDataset` (masks only; keypoints unused)."""
    from mrcnn.data.coco import CocoDataset

    root = output_dir / "figures"
    train_set = CocoDataset(root / "train", root / "annotations" / "person_keypoints_train.json",
                            remove_images_without_annotations=True)  # fmt: skip
    val_set = CocoDataset(root / "val", root / "annotations" / "person_keypoints_val.json")
    return train_set, val_set


def quiet_evaluate(model, dataset) -> dict:
    """COCO box and mask metrics of `model` on `dataset`, without pycocotools' tables on stdout."""
    from mrcnn.evaluate import evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate(model, dataset, progress=False)


# ---------------------------------------------------------------------------------------------
# Pretraining, and one run of an arm


def pretrain(args: argparse.Namespace) -> dict:
    """Train the shapes model once (module docstring), score it on held-out shapes, write its record."""
    import torch

    from mrcnn.config import shapes_small
    from mrcnn.data.coco import CocoDataset
    from mrcnn.model import MaskRCNN
    from mrcnn.train import paper_schedule, read_log, train

    settings = pretrain_settings(args)
    path = pretrain_record_path(args.output_dir)
    torch.set_num_threads(args.threads)
    torch.manual_seed(settings["seed"])
    root = args.output_dir / "shapes"
    train_set = CocoDataset(root / "train", root / "annotations" / "instances_train.json",
                            remove_images_without_annotations=True)  # fmt: skip
    val_set = CocoDataset(root / "val", root / "annotations" / "instances_val.json")
    model = MaskRCNN(shapes_small(train_set.num_classes))
    schedule = paper_schedule(settings["batch_size"], lr=settings["lr"], iterations=settings["iterations"],
                              warmup_iterations=settings["warmup"], clip_grad_norm=settings["clip_grad_norm"],
                              seed=settings["seed"], checkpoint_every=max(1, min(250, settings["iterations"])))  # fmt: skip
    load_before = os.getloadavg()
    train(model, train_set, schedule, path.parent, resume=True, progress=False,
          metadata={"category_names": list(train_set.category_names)})  # fmt: skip
    started = time.perf_counter()
    metrics = quiet_evaluate(model, val_set)
    record = {
        "settings": settings, "finished": True, "checkpoint": str(path.parent / "checkpoint.pt"),
        "metrics": metrics, "train_seconds": round(read_log(path.parent / "log.jsonl")[-1]["seconds"], 1),
        "evaluate_seconds": round(time.perf_counter() - started, 1),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "threads": torch.get_num_threads(), "torch": torch.__version__, "code": code_version(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    write_record(path, record)
    return record


def run_one(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """Train arm `arm` with seed `seed` on the figures, scoring it at each of `args.steps`; resumable."""
    import torch

    from mrcnn.config import shapes_small
    from mrcnn.model import MaskRCNN
    from mrcnn.train import TrainSettings, read_log, train
    from mrcnn.weights import load_pretrained

    settings = run_settings(args, arm)
    path = record_path(args.output_dir, arm, seed)
    record = read_record(path, settings)
    if record is None and path.parent.exists():
        shutil.rmtree(path.parent)  # another settings' run, or a torn record: its checkpoint must not be resumed
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)  # the fresh weights: all of them from scratch, the class layers when fine-tuning
    train_set, val_set = figures_datasets(args.output_dir)
    model = MaskRCNN(shapes_small(train_set.num_classes))
    report = None
    if arm == "fine_tuned":
        pretrained = pretrain_record_path(args.output_dir).parent / "checkpoint.pt"
        report = load_pretrained(model, pretrained, verbose=False)  # later segments resume from the run's checkpoint
    if record is None:
        record = {"arm": arm, "seed": seed, "description": ARMS[arm], "settings": settings,
                  "config": dataclasses.asdict(model.config), "finished": False, "points": [],
                  "load_average_before": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip
        if report is not None:
            record["pretrained"] = {"source": report.source, "kind": report.kind, "loaded": len(report.loaded),
                                    "reinitialised": report.reinitialised, "not_in_file": report.not_in_file,
                                    "unused": report.unused}  # fmt: skip
    schedule = TrainSettings(iterations=max(args.steps), batch_size=args.batch_size, lr=args.lr, decay_steps=(),
                             warmup_iterations=args.warmup, clip_grad_norm=10.0, seed=seed,
                             checkpoint_every=max(args.steps))  # fmt: skip
    done = {point["step"] for point in record["points"]}
    for step in sorted(args.steps):
        if step in done:
            continue
        # to `step` steps, from the run's checkpoint of the previous point (or from the start)
        train(model, train_set, dataclasses.replace(schedule, iterations=step), path.parent, resume=True, progress=False)
        started = time.perf_counter()
        metrics = quiet_evaluate(model, val_set)
        log = read_log(path.parent / "log.jsonl", step)
        record["points"].append({"step": step, "metrics": metrics, "train_seconds": round(log[-1]["seconds"], 1),
                                 "evaluate_seconds": round(time.perf_counter() - started, 1),
                                 "loss_mean_last_10": sum(r["loss"] for r in log[-10:]) / len(log[-10:])})  # fmt: skip
        write_record(path, record)
    record.update(finished=True, load_average_after=[round(v, 2) for v in os.getloadavg()],
                  threads=torch.get_num_threads(), torch=torch.__version__, code=code_version(),
                  finished_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))  # fmt: skip
    write_record(path, record)
    return record


def _run_job(job: tuple) -> tuple[tuple, dict | None, str | None]:
    name, args = job[:-1], job[-1]
    try:
        return name, (pretrain(args) if name == ("pretrain",) else run_one(*name, args)), None
    except Exception as error:  # one failed run must not stop the others; the summary names it
        return name, None, f"{type(error).__name__}: {error}"


def _describe(name: tuple, record: dict) -> str:
    if name == ("pretrain",):
        m = record["metrics"]
        return (f"pretrained on the shapes: mask AP {100 * m['segm']['AP']:.1f}, box AP {100 * m['bbox']['AP']:.1f}, "
                f"train {record['train_seconds']:.0f} s, load {record['load_average_after']}")  # fmt: skip
    curve = ", ".join(f"{p['step']}: {100 * p['metrics']['segm']['AP']:.1f}" for p in record["points"])
    return f"{name[0]} seed {name[1]}: mask AP by step {curve}; load {record['load_average_after']}"


def run_all(args: argparse.Namespace) -> dict:
    """Run whatever is not finished, `args.processes` at a time; fine-tuning waits for the pretraining."""
    pretraining = pretrain_settings(args)
    jobs = [] if finished(pretrain_record_path(args.output_dir), pretraining) else [("pretrain",)]
    jobs += [(arm, seed) for arm in ("from_scratch", "fine_tuned") for seed in args.seeds
             if finished(record_path(args.output_dir, arm, seed), run_settings(args, arm)) is None]  # fmt: skip
    total = 1 + len(ARMS) * len(args.seeds)
    print(f"{len(jobs)} runs to do, {total - len(jobs)} already finished", flush=True)
    errors: dict = {}

    def ready(name: tuple) -> bool:  # fine-tuning needs the pretrained checkpoint
        return name[0] != "fine_tuned" or finished(pretrain_record_path(args.output_dir), pretraining) is not None

    def report(name: tuple, record: dict | None, error: str | None) -> None:
        if error:
            errors[name] = error
            print(f"{' '.join(map(str, name))}: FAILED {error}", flush=True)
        else:
            print(_describe(name, record), flush=True)

    pending = list(jobs)
    if args.processes == 1:  # in this process, one after the other (the order above respects the dependency)
        for name in pending:
            if ready(name):
                report(*_run_job((*name, args)))
        return errors
    # one fresh process per run (maxtasksperchild=1): no memory or thread state carries over
    with multiprocessing.get_context("fork").Pool(args.processes, maxtasksperchild=1) as pool:
        running = []
        while pending or running:
            for name in [n for n in pending if ready(n)][: args.processes - len(running)]:
                pending.remove(name)
                running.append(pool.apply_async(_run_job, ((*name, args),)))
            if not running:
                break  # what is left waits for a pretraining that failed
            time.sleep(2)
            for result in [r for r in running if r.ready()]:
                running.remove(result)
                report(*result.get())
    return errors


# ---------------------------------------------------------------------------------------------
# The summary


def summarize(records: list[dict], steps: list[int]) -> dict:
    """Per arm and step: mask AP, mask AP50 and box AP (in %) over the seeds; the paired differences."""
    by_arm: dict[str, dict[int, dict]] = {}
    for record in records:
        by_arm.setdefault(record["arm"], {})[record["seed"]] = {p["step"]: p["metrics"] for p in record["points"]}
    arms = {}
    for arm, seeds in by_arm.items():
        curves = {}
        for step in steps:
            at_step = {s: m[step] for s, m in sorted(seeds.items()) if step in m}
            curves[str(step)] = {
                "seeds": list(at_step),
                **{name: spread([100 * m[iou][metric] for m in at_step.values()])
                   for name, iou, metric in (("mask_AP", "segm", "AP"), ("mask_AP50", "segm", "AP50"),
                                             ("box_AP", "bbox", "AP"))},
            }  # fmt: skip
        arms[arm] = {"description": ARMS[arm], "seeds": sorted(seeds), "by_step": curves}
    result = {"arms": arms}
    if len(by_arm) == len(ARMS):  # fine-tuned minus from scratch, seed by seed
        difference = {}
        for step in steps:
            pairs = [(by_arm["fine_tuned"][s][step], by_arm["from_scratch"][s][step]) for s in by_arm["fine_tuned"]
                     if s in by_arm["from_scratch"] and step in by_arm["fine_tuned"][s] and step in by_arm["from_scratch"][s]]  # fmt: skip
            if pairs:
                difference[str(step)] = {name: spread([100 * (a[iou]["AP"] - b[iou]["AP"]) for a, b in pairs])
                                         for name, iou in (("mask_AP", "segm"), ("box_AP", "bbox"))}  # fmt: skip
        result["fine_tuned_minus_from_scratch"] = difference
    return result


def _cell(stats: dict | None) -> str:
    return "-" if stats is None else f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def markdown(record: dict) -> str:
    """`transfer.md`: the curve as a table, then where the numbers come from."""
    arms, difference = record["arms"], record.get("fine_tuned_minus_from_scratch", {})
    pre = record.get("pretrain") or {}
    lines = ["# Fine-tuning a shapes model on a new task against training from scratch", "",
             f"Mask AP and box AP in % on {record['data']['num_val']} held-out stick-figure images (one class, "
             f"\"figure\"), after each number of steps of batch {record['settings']['batch_size']} on "
             f"{record['data']['num_train']} training images; mean ± sample standard deviation over the seeds "
             f"{record['settings']['seeds']}, then each seed's value. The difference is fine-tuned minus from "
             "scratch, seed by seed.", "",
             "| steps | fine-tuned mask AP | from scratch mask AP | difference | fine-tuned box AP | from scratch box AP "
             "| difference | fine-tuned mask AP per seed | from scratch mask AP per seed |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for step in record["settings"]["steps"]:
        cells = []
        for metric in ("mask_AP", "box_AP"):
            for arm in ("fine_tuned", "from_scratch"):
                cells.append(_cell(arms.get(arm, {}).get("by_step", {}).get(str(step), {}).get(metric)))
            cells.append(_cell(difference.get(str(step), {}).get(metric)))
        per_seed = [", ".join(f"{v:.1f}" for v in arms.get(arm, {}).get("by_step", {}).get(str(step), {})
                              .get("mask_AP", {}).get("values", [])) or "-" for arm in ("fine_tuned", "from_scratch")]  # fmt: skip
        lines.append(f"| {step} | {' | '.join(cells)} | {per_seed[0]} | {per_seed[1]} |")
    lines.append("")
    if pre:
        m, s = pre["metrics"], pre["settings"]
        lines += [f"Pretrained model: `shapes_small` on {s['num_train']} shapes images, {s['iterations']} steps of batch "
                  f"{s['batch_size']} (lr {s['lr']}, warm-up {s['warmup']}, clipping at {s['clip_grad_norm']}, the rate "
                  f"divided by 10 at 3/4), seed {s['seed']}: mask AP {100 * m['segm']['AP']:.1f}, box AP "
                  f"{100 * m['bbox']['AP']:.1f} on {s['num_val']} held-out shapes images; {pre['train_seconds']:.0f} s "
                  "of training.", ""]  # fmt: skip
    if record.get("reinitialised"):
        lines += [f"Re-initialised by `load_pretrained` (K = 5 in the file, 2 in the model): "
                  f"{', '.join(f'`{k}`' for k in record['reinitialised'])}; every other tensor loaded.", ""]  # fmt: skip
    lines += conditions(record)
    if record["missing_runs"]:
        lines += [f"Not run (or failed): {', '.join(record['missing_runs'])}.", ""]
    return "\n".join(lines)


def write_summary(args: argparse.Namespace, errors: dict) -> dict:
    """Collect the finished records and write `args.results` (JSON) and its `.md`."""
    import torch

    pre = finished(pretrain_record_path(args.output_dir), pretrain_settings(args))
    records, missing = [], [] if pre else ["pretrain" + (f" ({errors[('pretrain',)]})" if ("pretrain",) in errors else "")]
    for arm in ARMS:
        for seed in args.seeds:
            record = finished(record_path(args.output_dir, arm, seed), run_settings(args, arm))
            if record is not None:
                records.append(record)
            else:
                missing.append(f"{arm} seed {seed}" + (f" ({errors[(arm, seed)]})" if (arm, seed) in errors else ""))
    loads = [v for r in records + ([pre] if pre else []) for v in (r["load_average_before"][0], r["load_average_after"][0])]
    fine_tuned = [r for r in records if r["arm"] == "fine_tuned"]
    result = {
        "command": args.command,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_at_summary": [round(v, 2) for v in os.getloadavg()],
                    "torch": torch.__version__, "device": "cpu", "threads_per_run": args.threads,
                    "processes": args.processes, "niceness": os.nice(0)},  # fmt: skip
        "task": "fine-tune a shapes_small model pretrained on the shapes (K = 5) to the stick figures as one class "
                "(K = 2, masks only), against the same model trained from scratch with the same settings",
        "settings": {**run_settings(args, "fine_tuned"), "seeds": args.seeds},
        "data": {"num_train": args.num_train, "num_val": args.num_val, "seed": args.data_seed,
                 "task": "mrcnn/data/keypoints.py stick figures, one class, masks (keypoints ignored)"},  # fmt: skip
        "pretrain": pre and {k: pre[k] for k in ("settings", "metrics", "train_seconds", "evaluate_seconds", "code")},
        "reinitialised": fine_tuned[0]["pretrained"]["reinitialised"] if fine_tuned else None,
        "code_commits": sorted({str(r.get("code", {}).get("commit")) for r in records + ([pre] if pre else [])}),
        "code_uncommitted_edits_in_mrcnn": any(r.get("code", {}).get("uncommitted_edits") for r in records + ([pre] if pre else [])),
        "load_average_1min_over_runs": [min(loads, default=None), max(loads, default=None)],
        "ap_unit": "percent",
        "missing_runs": missing,
        **summarize(records, sorted(args.steps)),
        "runs": {f"{r['arm']}/seed_{r['seed']}": {"points": r["points"], "load_average_before": r["load_average_before"],
                                                  "load_average_after": r["load_average_after"]} for r in records},  # fmt: skip
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    args.results.with_suffix(".md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", nargs="+", type=int, default=[50, 100, 200, 400], help="score after these steps")
    parser.add_argument("--batch-size", type=int, default=2, help="images per fine-tuning (and from-scratch) step")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--num-train", type=int, default=100, help="training images of the new task")
    parser.add_argument("--num-val", type=int, default=100, help="held-out images of the new task")
    parser.add_argument("--pretrain-iterations", type=int, default=800, help="the demo trains 1500")
    parser.add_argument("--pretrain-batch-size", type=int, default=4)
    parser.add_argument("--pretrain-lr", type=float, default=0.02)
    parser.add_argument("--pretrain-warmup", type=int, default=100)
    parser.add_argument("--num-pretrain-train", type=int, default=2000)
    parser.add_argument("--num-pretrain-val", type=int, default=100)
    parser.add_argument("--data-seed", type=int, default=0, help="the seed of both data sets")
    parser.add_argument("--processes", type=int, default=2, help="runs at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "transfer")
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "transfer.json")
    parser.add_argument("--summarize-only", action="store_true", help="write the results from the finished runs")
    args = parser.parse_args(argv)
    args.command = " ".join(["python", os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    if min(args.processes, args.threads, args.batch_size, args.pretrain_iterations, *args.steps) < 1:
        parser.error("--processes, --threads, --batch-size, --pretrain-iterations and --steps must be >= 1")
    if args.num_train < args.batch_size:
        parser.error(f"--num-train {args.num_train} is less than one batch of {args.batch_size}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch is imported
    errors: dict = {}
    if not args.summarize_only:
        prepare_data(args)
        errors = run_all(args)
    result = write_summary(args, errors)
    print(args.results.with_suffix(".md").read_text())
    return 1 if result["missing_runs"] and not args.summarize_only else 0


if __name__ == "__main__":
    raise SystemExit(main())
