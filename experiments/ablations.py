"""The paper's ablations (section 4.2, Table 2) and its Faster against Mask R-CNN box AP (section 4.3,
Table 3), in miniature on the synthetic shapes.

Each arm is the `shapes_small` preset (or its C4 / C5 variant) with one switch of
`mrcnn/config.py` changed, trained from scratch with the same budget and schedule as every
other arm (the demo's recipe, `mrcnn/demo.py`: SGD, lr 0.02, batch 4, linear warm-up, gradient
clipping at 10), on the same images (`mrcnn/data/shapes.py`, drawn once into the output
directory), for several seeds. The seed sets the initial weights, the data order and the RoI
sampling; the data set is the same for every run. Each run is scored on the held-out images
with COCO's mask AP and box AP (`mrcnn/evaluate.py`).

    python experiments/ablations.py --table 2c --seeds 0 1 2       # one paper table
    python experiments/ablations.py --arms c4_align c4_pool         # some arms
    python experiments/ablations.py                                 # everything, most important first
    python experiments/ablations.py --summarize-only                # tables from the finished runs

Every (arm, seed) run writes `OUTPUT/runs/ARM/seed_S/result.json` as soon as it is scored, and a
run whose record is there (with the same settings) is skipped, so an interrupted sweep resumes
where it stopped; a run killed half-way resumes from its last checkpoint. The summary step
writes `experiments/results/ablations.json` and `ablations.md`: per paper table, each arm's
mean and sample standard deviation over the seeds, every seed's value, and the paper's COCO
numbers next to them; `"table3"` holds the Faster / Mask R-CNN box AP of section 4.3.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import mrcnn
from mrcnn import config as config_module
from mrcnn.checkpoint import load_checkpoint, model_from_checkpoint
from mrcnn.data.shapes import generate_shapes
from mrcnn.evaluate import evaluate
from mrcnn.jobs import open_dataset
from mrcnn.model import MaskRCNN
from mrcnn.train import paper_schedule, read_log, train

ROOT = Path(__file__).resolve().parents[1]
RECORD_NAME = "result.json"
METRICS = ("AP", "AP50", "AP75")


@dataclass(frozen=True)
class Arm:
    """One model variant: a preset of `mrcnn/config.py` and the fields changed from it."""

    preset: str  # "shapes_small", "shapes_small_c4" or "shapes_small_c5"
    changes: dict = field(default_factory=dict)  # MaskRCNNConfig fields set by config.replace(...)
    label: str = ""  # how the paper's table names the row


# The arms, most important first (the order a sweep runs them in): RoIAlign against RoIPool at
# both strides, the default model with and without its mask branch (Table 3), sigmoid against
# softmax, then the rest. Shared arms serve several tables: `fpn` is the default model of 2a,
# 2b, 2e and Table 3; `c4_align` of 2a and 2c.
ARMS = {
    "c4_align": Arm("shapes_small_c4", {"roi_pooler": "align"}, "RoIAlign (C4, stride 16)"),
    "c4_pool": Arm("shapes_small_c4", {"roi_pooler": "pool"}, "RoIPool (C4, stride 16)"),
    "c5_align": Arm("shapes_small_c5", {"roi_pooler": "align"}, "RoIAlign (C5, stride 32)"),
    "c5_pool": Arm("shapes_small_c5", {"roi_pooler": "pool"}, "RoIPool (C5, stride 32)"),
    "fpn": Arm("shapes_small", {}, "FPN, RoIAlign, sigmoid, class-specific, FCN (the default)"),
    "faster_fpn": Arm("shapes_small", {"mask": False}, "Faster R-CNN, RoIAlign (no mask branch)"),
    "fpn_softmax": Arm("shapes_small", {"mask_loss": "softmax"}, "softmax (multinomial masks)"),
    "c4_warp": Arm("shapes_small_c4", {"roi_pooler": "warp"}, "RoIWarp (C4, stride 16)"),
    "fpn_agnostic": Arm("shapes_small", {"class_agnostic_masks": True}, "class-agnostic masks"),
    "fpn_mlp": Arm("shapes_small", {"mask_head": "mlp"}, "MLP mask head"),
    "c5_warp": Arm("shapes_small_c5", {"roi_pooler": "warp"}, "RoIWarp (C5, stride 32)"),
}

# The paper's tables: which arms answer them and the paper's COCO numbers for each (in %, as
# printed in Table 2 and Table 3 of He et al. 2017; "mask" is mask AP, "box" box AP).
TABLES = {
    "2c": {
        "title": "Table 2c: RoIAlign vs RoIWarp vs RoIPool, stride 16 (paper: ResNet-50-C4)",
        "arms": ["c4_align", "c4_warp", "c4_pool"],
        "paper": {"c4_align": {"mask": (30.3, 51.2, 31.5), "note": "RoIAlign, ave"},
                  "c4_warp": {"mask": (27.1, 48.9, 27.1), "note": "RoIWarp, ave (max: 27.2, 49.2, 27.1)"},
                  "c4_pool": {"mask": (26.9, 48.8, 26.4), "note": "RoIPool, max"}},  # fmt: skip
        "paper_finding": "RoIAlign improves mask AP by about 3 points and AP75 by about 5; RoIWarp, which "
                         "samples bilinearly but still quantizes the RoI, is on par with RoIPool.",
    },
    "2d": {
        "title": "Table 2d: RoIAlign vs RoIPool, stride 32 (paper: ResNet-50-C5)",
        "arms": ["c5_align", "c5_pool", "c5_warp"],
        "paper": {"c5_align": {"mask": (30.9, 51.8, 32.1), "box": (34.0, 55.3, 36.4)},
                  "c5_pool": {"mask": (23.6, 46.5, 21.6), "box": (28.2, 52.7, 26.9)}},  # fmt: skip
        "paper_finding": "with stride-32 features the gap grows: +7.3 mask AP, +10.5 mask AP75, +5.8 box AP.",
    },
    "2b": {
        "title": "Table 2b and section 4.2: sigmoid vs softmax masks, class-specific vs class-agnostic "
                 "(paper: ResNet-50-C4; here: FPN)",
        "arms": ["fpn", "fpn_softmax", "fpn_agnostic"],
        "paper": {"fpn": {"mask": (30.3, 51.2, 31.5), "note": "sigmoid, class-specific"},
                  "fpn_softmax": {"mask": (24.8, 44.1, 25.1)},
                  "fpn_agnostic": {"mask": (29.7, None, None), "note": "text of section 4.2, AP only"}},  # fmt: skip
        "paper_finding": "per-class sigmoid masks beat a softmax over classes by 5.5 mask AP; class-agnostic "
                         "masks are nearly as good as class-specific ones (29.7 vs 30.3).",
    },
    "2e": {
        "title": "Table 2e: FCN vs MLP mask head (paper: ResNet-50-FPN)",
        "arms": ["fpn", "fpn_mlp"],
        "paper": {"fpn": {"mask": (33.6, 55.2, 35.3), "note": "FCN, four 3x3 convs"},
                  "fpn_mlp": {"mask": (31.5, 53.7, 32.8), "note": "MLP fc 1024-1024"}},  # fmt: skip
        "paper_finding": "the FCN head beats the MLP by 2.1 mask AP: convolutions keep the spatial layout.",
    },
    "2a": {
        "title": "Table 2a: FPN vs C4 features (paper: ResNet-50; here: the small trunk)",
        "arms": ["fpn", "c4_align"],
        "paper": {"fpn": {"mask": (33.6, 55.2, 35.3), "note": "ResNet-50-FPN"},
                  "c4_align": {"mask": (30.3, 51.2, 31.5), "note": "ResNet-50-C4"}},  # fmt: skip
        "paper_finding": "FPN outperforms C4 features (+3.3 mask AP with ResNet-50); deeper trunks do better.",
    },
    "3": {
        "title": "Table 3 / section 4.3: Faster R-CNN vs Mask R-CNN box AP (same data, same budget)",
        "arms": ["fpn", "faster_fpn"],
        "paper": {"fpn": {"box": (38.2, 60.3, 41.7), "note": "Mask R-CNN, ResNet-101-FPN, test-dev"},
                  "faster_fpn": {"box": (37.3, 59.6, 40.3), "note": "Faster R-CNN, RoIAlign, ResNet-101-FPN"}},  # fmt: skip
        "paper_finding": "the mask branch adds 0.9 box AP, 'due solely to the benefits of multi-task training'.",
    },
}
TABLE_ORDER = ("2c", "2d", "2b", "3", "2e", "2a")  # the most important first


def arm_config(name: str, num_classes: int = 5):
    """The `MaskRCNNConfig` of arm `name`: its preset, with its changes applied by `config.replace`."""
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; choose among {sorted(ARMS)}")
    arm = ARMS[name]
    preset = getattr(config_module, arm.preset, None)
    if preset is None:
        raise ValueError(f"arm {name!r} needs the preset mrcnn.config.{arm.preset}(), which does not exist yet")
    return preset(num_classes).replace(**arm.changes)


def arms_for(tables: list[str] | None, arms: list[str] | None) -> list[str]:
    """The arms to run for `--table` and `--arms`, in the sweep's order (most important first)."""
    chosen = set(arms or ())
    for table in tables or ():
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; choose among {list(TABLES)}")
        chosen.update(TABLES[table]["arms"])
    unknown = sorted(chosen - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose among {sorted(ARMS)}")
    if not tables and not arms:
        chosen = set(ARMS)
    return [name for name in ARMS if name in chosen]


# ---------------------------------------------------------------------------------------------
# One run: train, score, write the record


def run_settings(args: argparse.Namespace) -> dict:
    """What a run's result depends on besides its arm and seed; a record with other settings is stale."""
    return {"iterations": args.iterations, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
            "clip_grad_norm": 10.0, "num_train": args.num_train, "num_val": args.num_val, "data_seed": args.data_seed}  # fmt: skip


def record_path(output_dir: Path, arm: str, seed: int) -> Path:
    return output_dir / "runs" / arm / f"seed_{seed}" / RECORD_NAME


def finished(output_dir: Path, arm: str, seed: int, settings: dict) -> dict | None:
    """The record of run (arm, seed) if it finished with these settings, else None."""
    path = record_path(output_dir, arm, seed)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write: run it again
    return record if record.get("settings") == settings else None


# The other ways to read a softmax-loss model's masks, scored beside the library's (where the
# object's class k wins the pixel, `mrcnn.mask_head.softmax_decision`): the metrics key of each,
# what it is, and its rule, which maps the mask logits `[D, K, M, M]` and the detections'
# classes `[D]` to a map `[D, M, M]` cut at one half. Its summary key is "mask_..." for "segm_...".
SOFTMAX_READINGS = {
    # Where the probability is shared among classes, k can win the pixel and fall short of one half.
    "segm_p_k": ("p_k > 1/2 (the softmax probability of class k over all classes)",
                 lambda logits, k, index: logits.softmax(dim=1)[index, k]),
    # p_k / (p_k + p_0) = sigmoid(m_k - m_0)
    "segm_two_way": ("sigmoid(m_k - m_0) > 1/2 (class k against the background only)",
                     lambda logits, k, index: (logits[index, k] - logits[:, 0]).sigmoid()),
}  # fmt: skip


@contextlib.contextmanager
def softmax_mask_reading(model, reading: str):
    """Decode a softmax-loss model's masks by `SOFTMAX_READINGS[reading]` while inside.

    The library's rule (mrcnn/mask_head.py) is the one a per-pixel softmax implies: the pixel
    belongs to the class that wins it. The other readings tell how much of the variant's mask
    AP is the decoding rule rather than the training.
    """
    _, rule = SOFTMAX_READINGS[reading]
    branch = model.mask_branch
    library_predict = branch.predict

    def predict(features, detections):
        mask_logits = branch.mask_logits(features, [d["boxes"] for d in detections])  # [D, K, M, M]
        labels = torch.cat([d["labels"] for d in detections])  # [D]
        index = torch.arange(labels.shape[0], device=labels.device)  # [D]
        probabilities = rule(mask_logits.float(), labels, index)[:, None]  # [D, 1, M, M]
        per_image = probabilities.split([d["labels"].shape[0] for d in detections])
        return [{**d, "masks": masks} for d, masks in zip(detections, per_image)]

    branch.predict = predict
    try:
        yield model
    finally:
        branch.predict = library_predict


def score(model, val_set, directory: Path | None) -> dict:
    """COCO metrics of the model on the held-out images ("bbox", "segm"), and for a softmax-loss
    model its masks read the other ways too ("segm_p_k", "segm_two_way")."""
    metrics = evaluate(model, val_set, output_dir=directory, progress=False)
    config = model.config
    if config.mask and config.mask_loss == "softmax":  # the same model, its masks read the other ways
        for reading in SOFTMAX_READINGS:
            with softmax_mask_reading(model, reading):
                metrics[reading] = evaluate(model, val_set, progress=False)["segm"]
    return metrics


def code_version() -> dict:
    """Which code trained: the `mrcnn` package's folder and its commit (a `COMMIT` file next to a
    snapshot made with `git archive`, else the repository's HEAD and whether `mrcnn/` had edits)."""
    package = Path(mrcnn.__file__).resolve().parent
    stamp = package.parent / "COMMIT"
    if stamp.is_file():
        return {"mrcnn": str(package), "commit": stamp.read_text().strip(), "snapshot": True}
    git = ["git", "-C", str(package.parent)]
    try:
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        edits = subprocess.run(git + ["status", "--porcelain", "mrcnn"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"mrcnn": str(package), "commit": None, "snapshot": False}
    return {"mrcnn": str(package), "commit": commit, "snapshot": False, "uncommitted_edits": bool(edits.strip())}


def run_one(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """Train arm `arm` with seed `seed`, score it on the held-out shapes, write its record atomically."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)  # the initial weights
    data = args.output_dir / "shapes"
    train_set, val_set = open_dataset(data, "train", train=True), open_dataset(data, "val")
    config = arm_config(arm, train_set.num_classes)
    model = MaskRCNN(config)
    settings = paper_schedule(args.batch_size, lr=args.lr, iterations=args.iterations, warmup_iterations=args.warmup,
                              clip_grad_norm=10.0, seed=seed, checkpoint_every=args.checkpoint_every)  # fmt: skip
    directory = record_path(args.output_dir, arm, seed).parent
    load_before = os.getloadavg()
    summary = train(model, train_set, settings, directory, resume=True, progress=False)
    log = read_log(directory / "log.jsonl")
    started = time.perf_counter()
    metrics = score(model, val_set, directory)
    evaluate_seconds = time.perf_counter() - started
    last = log[-50:]  # the mean of the last 50 steps: one step's loss is noisy
    record = {
        "arm": arm, "seed": seed, "preset": ARMS[arm].preset, "changes": ARMS[arm].changes,
        "config": dataclasses.asdict(config), "settings": run_settings(args), "metrics": metrics,
        "train_seconds": round(log[-1]["seconds"], 1),  # over resumed parts too: the log's clock
        "evaluate_seconds": round(evaluate_seconds, 1), "steps": summary["steps"],
        "final_losses_mean_last_50": {k: sum(r[k] for r in last) / len(last) for k in last[-1] if k.startswith("loss")},
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "threads": torch.get_num_threads(), "torch": torch.__version__, "code": code_version(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    write_record(record_path(args.output_dir, arm, seed), record)
    return record


def needs_rescoring(record: dict) -> bool:
    """Whether a finished record lacks a reading this code makes: a softmax-loss run scored before
    the library read its masks by the winning class (its "segm" was then p_k > 1/2)."""
    changes = record.get("changes", {})
    return changes.get("mask_loss") == "softmax" and not all(r in record["metrics"] for r in SOFTMAX_READINGS)


def rescore(args: argparse.Namespace, arms: list[str]) -> list[str]:
    """Score again, from the checkpoint of its last step, each finished run of these arms that
    `needs_rescoring`; its record keeps the metrics it had and says which code scored it again."""
    torch.set_num_threads(args.threads)
    settings, val_set, done = run_settings(args), None, []
    for arm in arms:
        for seed in args.seeds:
            record = finished(args.output_dir, arm, seed, settings)
            if record is None or not needs_rescoring(record):
                continue
            path = record_path(args.output_dir, arm, seed)
            directory = path.parent
            checkpoint = load_checkpoint(directory / "checkpoint.pt")
            if checkpoint["step"] != record["steps"]:
                raise RuntimeError(f"{directory}: the checkpoint holds step {checkpoint['step']}, the record {record['steps']} steps")
            val_set = val_set or open_dataset(args.output_dir / "shapes", "val")
            model = model_from_checkpoint(checkpoint, directory / "checkpoint.pt").eval()
            previous = record["metrics"]
            record["metrics"] = score(model, val_set, directory)
            record["rescored"] = {"code": code_version(), "previous_metrics": previous,
                                  "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}  # fmt: skip
            write_record(path, record)
            done.append(f"{arm} seed {seed}")
            new = record["metrics"]
            print(f"{arm} seed {seed} scored again: mask AP {100 * new['segm']['AP']:.1f} (the class that wins the pixel), "
                  + ", ".join(f"{r} {100 * new[r]['AP']:.1f}" for r in SOFTMAX_READINGS)
                  + f"; before: {100 * previous['segm']['AP']:.1f}", flush=True)  # fmt: skip
    return done


def write_record(path: Path, record: dict) -> None:
    """Write a run's record atomically: it is either whole or absent."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(path)


def _run_job(job: tuple[str, int, argparse.Namespace]) -> tuple[str, int, dict | None, str | None]:
    arm, seed, args = job
    try:
        return arm, seed, run_one(arm, seed, args), None
    except Exception as error:  # one failed arm must not stop the sweep; the summary names it
        return arm, seed, None, f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------------
# The summary: mean and spread over seeds, per paper table


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1; 0 for one value) and the values themselves."""
    if not values:
        raise ValueError("spread of no values")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": list(values), "n": len(values)}


def summarize_arm(records: list[dict]) -> dict:
    """Per-arm statistics over its seeds, AP in percent (as the paper prints them)."""
    records = sorted(records, key=lambda r: r["seed"])
    summary = {"seeds": [r["seed"] for r in records], "preset": records[0]["preset"], "changes": records[0]["changes"]}
    readings = [(reading, reading.replace("segm", "mask", 1)) for reading in SOFTMAX_READINGS]
    for iou_type, key in (("segm", "mask"), ("bbox", "box"), *readings):
        if all(iou_type in r["metrics"] for r in records):
            for metric in METRICS:
                summary[f"{key}_{metric}"] = spread([100 * r["metrics"][iou_type][metric] for r in records])
    summary["train_seconds"] = spread([r["train_seconds"] for r in records])
    return summary


def summarize(records: list[dict]) -> dict:
    """{"arms": per-arm statistics, "tables": per paper table its rows with the paper's numbers,
    "table3": the section 4.3 comparison}; arms without a finished run are listed as missing."""
    by_arm: dict[str, list[dict]] = {}
    for record in records:
        by_arm.setdefault(record["arm"], []).append(record)
    arms = {name: summarize_arm(by_arm[name]) for name in ARMS if name in by_arm}
    tables = {}
    for table in TABLE_ORDER:
        spec = TABLES[table]
        rows = []
        for name in spec["arms"]:
            paper = spec["paper"].get(name, {})
            rows.append({"arm": name, "label": ARMS[name].label, "ran": name in arms,
                         "paper": {k: (dict(zip(METRICS, v)) if isinstance(v, tuple) else v) for k, v in paper.items()}})  # fmt: skip
        tables[table] = {"title": spec["title"], "paper_finding": spec["paper_finding"], "rows": rows}
    result = {"arms": arms, "tables": tables}
    table3 = {"title": TABLES["3"]["title"], "paper_finding": TABLES["3"]["paper_finding"],
              "paper_box_AP": {"mask_rcnn": dict(zip(METRICS, TABLES["3"]["paper"]["fpn"]["box"])),
                               "faster_rcnn": dict(zip(METRICS, TABLES["3"]["paper"]["faster_fpn"]["box"]))}}  # fmt: skip
    for key, name in (("mask_rcnn", "fpn"), ("faster_rcnn", "faster_fpn")):
        if name in arms:
            table3[key] = {"arm": name, **{m: arms[name][f"box_{m}"] for m in METRICS},
                           "train_seconds": arms[name]["train_seconds"]}  # fmt: skip
    if "mask_rcnn" in table3 and "faster_rcnn" in table3:
        mask_by_seed = dict(zip(arms["fpn"]["seeds"], arms["fpn"]["box_AP"]["values"]))
        faster_by_seed = dict(zip(arms["faster_fpn"]["seeds"], arms["faster_fpn"]["box_AP"]["values"]))
        common = sorted(set(mask_by_seed) & set(faster_by_seed))
        if common:  # the same seed: the same initial trunk, data order and sampling
            table3["box_AP_gain_per_seed"] = spread([mask_by_seed[s] - faster_by_seed[s] for s in common])
    result["table3"] = table3
    return result


def _cell(stats: dict | None) -> str:
    return "-" if stats is None else f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def conditions(record: dict) -> list[str]:
    """The closing lines of a sweep's markdown (this one's and experiments/transfer.py's): the
    command, the machine and its load, the code that trained (and that scored again), the settings."""
    machine = record["machine"]
    niceness = f", niceness {machine['niceness']}" if "niceness" in machine else ""
    edits = " (with uncommitted edits in mrcnn/)" if record.get("code_uncommitted_edits_in_mrcnn") else ""
    rescored = f" Scored again from their checkpoints (--rescore): {'; '.join(record['rescored'])}." if record.get("rescored") else ""
    low, high = record["load_average_1min_over_runs"]
    return [f"Command: `{record['command']}`", "",
            f"Machine: {machine['processor']}, {machine['cpu_count']} cores, {machine['platform']}; torch {machine['torch']}, "
            f"{machine['threads_per_run']} thread per run, up to {machine['processes']} runs at once{niceness}; 1-minute "
            f"load average at the start and end of the runs: {low} to {high} (a shared machine: the seconds are not "
            f"speeds). Code: mrcnn at commit {', '.join(record['code_commits'])}{edits}.{rescored}", "",
            f"Settings: {record['settings']}", ""]  # fmt: skip


def markdown(record: dict) -> str:
    """The tables of `ablations.md`: ours next to the paper's, per paper table."""
    lines = ["# The paper's ablations (Table 2) and box detection (Table 3) on the synthetic shapes", "",
             "AP in %, mean ± sample standard deviation over the seeds, and each seed's value. "
             "Paper: COCO numbers of He et al. 2017 (minival for Table 2, test-dev for Table 3); ours: "
             f"{record['data']['num_val']} held-out shapes images. Paper columns: AP, AP50, AP75.", ""]  # fmt: skip
    arms = record["arms"]
    for table, spec in record["tables"].items():
        primary = "box" if table == "3" else "mask"  # the metric the paper's table reports
        lines += [f"## {spec['title']}", "", f"Paper: {spec['paper_finding']}", "",
                  f"| arm | mask AP | mask AP50 | mask AP75 | box AP | box AP50 | box AP75 | {primary} AP per seed | "
                  "paper mask AP | paper box AP | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in spec["rows"]:
            stats, paper = arms.get(row["arm"]), row["paper"]
            paper_numbers = [", ".join("-" if v is None else f"{v}" for v in paper[k].values()) if k in paper else "-"
                             for k in ("mask", "box")]  # fmt: skip
            if stats is None:
                lines.append(f"| {row['arm']}: {row['label']} | not run | | | | | | | {paper_numbers[0]} | {paper_numbers[1]} | |")
                continue
            cells = [_cell(stats.get(f"{key}_{metric}")) for key in ("mask", "box") for metric in METRICS]
            values = stats.get(f"{primary}_AP", {}).get("values", [])
            per_seed = ", ".join(f"{v:.1f}" for v in values) or "-"
            lines.append(f"| {row['arm']}: {row['label']} | {' | '.join(cells)} | {per_seed} | {paper_numbers[0]} | "
                         f"{paper_numbers[1]} | {stats['train_seconds']['mean']:.0f} |")  # fmt: skip
        for row in spec["rows"]:
            stats = arms.get(row["arm"]) or {}
            for name, (reading, _) in SOFTMAX_READINGS.items():
                key = name.replace("segm", "mask", 1)
                if f"{key}_AP" in stats:
                    values = ", ".join(f"{v:.1f}" for v in stats[f"{key}_AP"]["values"])
                    lines += ["", f"{row['arm']}, the same models with masks read as {reading} instead of by the class "
                              f"that wins the pixel: mask AP {_cell(stats[f'{key}_AP'])} ({values}), AP50 "
                              f"{_cell(stats[f'{key}_AP50'])}, AP75 {_cell(stats[f'{key}_AP75'])}."]  # fmt: skip
        lines.append("")
    table3 = record["table3"]
    if "box_AP_gain_per_seed" in table3:
        gain = table3["box_AP_gain_per_seed"]
        lines += ["## Section 4.3: does the mask branch help the boxes?", "",
                  f"Box AP of Mask R-CNN minus Faster R-CNN, same seed: {_cell(gain)} "
                  f"([{', '.join(f'{v:+.1f}' for v in gain['values'])}]); paper: +0.9 (38.2 vs 37.3).", ""]  # fmt: skip
    lines += conditions(record)
    if record["missing_runs"]:
        lines += [f"Not run (or failed): {', '.join(record['missing_runs'])}.", ""]
    return "\n".join(lines)


def write_summary(args: argparse.Namespace, arms: list[str], errors: dict) -> dict:
    """Collect the finished records of every arm (not only this invocation's) and write the results."""
    settings = run_settings(args)
    records, missing = [], []
    for name in ARMS:
        for seed in args.seeds:
            record = finished(args.output_dir, name, seed, settings)
            if record is not None:
                records.append(record)
            elif name in arms:
                missing.append(f"{name} seed {seed}" + (f" ({errors[(name, seed)]})" if (name, seed) in errors else ""))
    result = summarize(records)
    result = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_at_summary": [round(v, 2) for v in os.getloadavg()],
                    "torch": torch.__version__, "device": "cpu", "threads_per_run": args.threads,
                    "processes": args.processes},  # fmt: skip
        "settings": {**settings, "seeds": args.seeds},
        "data": {"num_train": args.num_train, "num_val": args.num_val, "seed": args.data_seed},
        "code_commits": sorted({str(r.get("code", {}).get("commit")) for r in records}),
        "rescored": sorted(f"{r['arm']} seed {r['seed']} at commit {r['rescored']['code'].get('commit')}"
                           for r in records if "rescored" in r),  # fmt: skip
        "load_average_1min_over_runs": [min((v for r in records for v in (r["load_average_before"][0], r["load_average_after"][0])), default=None),
                                        max((v for r in records for v in (r["load_average_before"][0], r["load_average_after"][0])), default=None)],  # fmt: skip
        "ap_unit": "percent",
        "missing_runs": missing,
        **result,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    args.results.with_suffix(".md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", nargs="+", choices=list(TABLES), help="run the arms of these paper tables")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help="run these arms")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=1500, help="steps per run (1500: the demo's budget)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--data-seed", type=int, default=0, help="the seed of the shapes data set (the same for all runs)")
    parser.add_argument("--processes", type=int, default=2, help="runs at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (resume points)")
    parser.add_argument("--stop-after-minutes", type=float, default=None, help="start no run after this long")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "ablations")
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "ablations.json")
    parser.add_argument("--summarize-only", action="store_true", help="write the results from the finished runs")
    parser.add_argument("--rescore", action="store_true",
                        help="score finished runs again from their checkpoints where this code reads them another way "
                             "(softmax-loss runs scored before masks were read by the winning class), then summarize")  # fmt: skip
    args = parser.parse_args(argv)
    if args.processes < 1 or args.threads < 1 or args.iterations < 1:
        parser.error("--processes, --threads and --iterations must be >= 1")
    try:
        arms = arms_for(args.table, args.arms)
    except ValueError as error:
        parser.error(str(error))

    errors: dict = {}
    if args.rescore:
        print(f"{len(rescore(args, arms))} runs scored again", flush=True)
    elif not args.summarize_only:
        generate_shapes(args.output_dir / "shapes", args.num_train, args.num_val, seed=args.data_seed)
        settings = run_settings(args)
        jobs = [(arm, seed, args) for arm in arms for seed in args.seeds if finished(args.output_dir, arm, seed, settings) is None]
        print(f"{len(jobs)} runs to do, {len(arms) * len(args.seeds) - len(jobs)} already finished", flush=True)
        started = time.monotonic()
        deadline = None if args.stop_after_minutes is None else started + 60 * args.stop_after_minutes
        context = multiprocessing.get_context("fork")
        # one fresh process per run (maxtasksperchild=1): no memory or thread state carries over
        with context.Pool(args.processes, maxtasksperchild=1) as pool:
            pending = list(jobs)
            running = []
            while pending or running:
                while pending and len(running) < args.processes and (deadline is None or time.monotonic() < deadline):
                    job = pending.pop(0)
                    running.append(pool.apply_async(_run_job, (job,)))
                if not running:
                    break  # the deadline passed: the rest is left for a later call
                time.sleep(2)
                for result in [r for r in running if r.ready()]:
                    running.remove(result)
                    arm, seed, record, error = result.get()
                    if error:
                        errors[(arm, seed)] = error
                        print(f"{arm} seed {seed}: FAILED {error}", flush=True)
                    else:
                        m = record["metrics"]
                        mask = f"mask AP {100 * m['segm']['AP']:.1f}, " if "segm" in m else ""
                        print(f"{arm} seed {seed}: {mask}box AP {100 * m['bbox']['AP']:.1f}, train "
                              f"{record['train_seconds']:.0f} s, load {record['load_average_after']}", flush=True)  # fmt: skip
        if pending:
            print(f"stopped at the time limit; not started: {[(a, s) for a, s, _ in pending]}", flush=True)
    result = write_summary(args, arms, errors)
    print(args.results.with_suffix(".md").read_text())
    return 1 if result["missing_runs"] and not (args.summarize_only or args.rescore) else 0


if __name__ == "__main__":
    raise SystemExit(main())
