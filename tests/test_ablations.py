"""experiments/ablations.py: the arms are the configs they claim, runs resume and skip, the summary's
statistics, and one arm end to end at a tiny budget (paper section 4.2 Table 2, section 4.3 Table 3)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "experiments" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablations"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["ablations"]


def differing_fields(a, b) -> set[str]:
    a, b = dataclasses.asdict(a), dataclasses.asdict(b)
    return {name for name in a if a[name] != b[name]}


# ----------------------------------------------------------------------------------------
# The arms


@pytest.mark.parametrize(
    "first, second, fields",
    [
        ("c4_align", "c4_pool", {"roi_pooler"}),  # Table 2c
        ("c4_align", "c4_warp", {"roi_pooler"}),
        ("c5_align", "c5_pool", {"roi_pooler"}),  # Table 2d
        ("c5_align", "c5_warp", {"roi_pooler"}),
        ("fpn", "fpn_softmax", {"mask_loss"}),  # Table 2b
        ("fpn", "fpn_agnostic", {"class_agnostic_masks"}),  # section 4.2, class-agnostic masks
        ("fpn", "fpn_mlp", {"mask_head"}),  # Table 2e
        ("fpn", "faster_fpn", {"mask"}),  # Table 3: the same model without the mask branch
    ],
)
def test_paired_arms_differ_in_one_switch_only(ablations, first, second, fields):
    assert differing_fields(ablations.arm_config(first), ablations.arm_config(second)) == fields


def test_arms_set_the_switch_they_name(ablations):
    config = ablations.arm_config
    assert [config(a).roi_pooler for a in ("c4_align", "c4_warp", "c4_pool")] == ["align", "warp", "pool"]
    assert [config(a).architecture for a in ("c4_align", "c5_align", "fpn")] == ["c4", "c5", "fpn"]
    assert config("fpn_softmax").mask_loss == "softmax" and config("fpn").mask_loss == "sigmoid"
    assert config("fpn_agnostic").class_agnostic_masks and not config("fpn").class_agnostic_masks
    assert config("fpn_mlp").mask_head == "mlp" and config("fpn").mask_head == "fcn"
    assert not config("faster_fpn").mask and config("fpn").mask
    # the default arm is the shapes_small preset itself; the C4 and C5 arms their presets
    from mrcnn.config import shapes_small, shapes_small_c4, shapes_small_c5

    assert config("fpn") == shapes_small() and config("c4_align") == shapes_small_c4()
    assert config("c5_align") == shapes_small_c5()
    assert differing_fields(config("fpn"), config("c4_align")) >= {"architecture"}  # Table 2a


def test_every_table_names_known_arms_and_the_paper_numbers_are_percent(ablations):
    for name, table in ablations.TABLES.items():
        assert set(table["arms"]) <= set(ablations.ARMS), name
        assert set(table["paper"]) <= set(table["arms"]), name
        for numbers in table["paper"].values():
            for key in ("mask", "box"):
                if key in numbers:
                    assert len(numbers[key]) == 3 and 20 < numbers[key][0] < 45  # AP, AP50, AP75 in %
    assert set(ablations.TABLE_ORDER) == set(ablations.TABLES)


def test_unknown_arms_and_tables_are_refused(ablations):
    with pytest.raises(ValueError, match="unknown arm"):
        ablations.arm_config("c4_roialign")
    with pytest.raises(ValueError, match="unknown table"):
        ablations.arms_for(["2f"], None)
    assert ablations.arms_for(["2c"], ["faster_fpn"]) == ["c4_align", "c4_pool", "faster_fpn", "c4_warp"]
    assert ablations.arms_for(None, None) == list(ablations.ARMS)


# ----------------------------------------------------------------------------------------
# Resume and skip; the summary


def fake_record(ablations, arm: str, seed: int, mask_ap: float | None, box_ap: float, settings: dict) -> dict:
    metrics = {"bbox": {"AP": box_ap, "AP50": box_ap + 0.2, "AP75": box_ap}}
    if mask_ap is not None:
        metrics["segm"] = {"AP": mask_ap, "AP50": mask_ap + 0.1, "AP75": mask_ap - 0.1}
    return {"arm": arm, "seed": seed, "preset": ablations.ARMS[arm].preset, "changes": ablations.ARMS[arm].changes,
            "settings": settings, "metrics": metrics, "train_seconds": 100.0 + seed}  # fmt: skip


def test_a_run_counts_as_finished_only_with_a_whole_record_of_the_same_settings(ablations, tmp_path):
    settings = {"iterations": 600, "batch_size": 4}
    assert ablations.finished(tmp_path, "fpn", 0, settings) is None
    path = ablations.record_path(tmp_path, "fpn", 0)
    path.parent.mkdir(parents=True)
    path.write_text('{"arm": "fpn", "se')  # a torn write
    assert ablations.finished(tmp_path, "fpn", 0, settings) is None
    path.write_text(json.dumps(fake_record(ablations, "fpn", 0, 0.4, 0.5, settings)))
    assert ablations.finished(tmp_path, "fpn", 0, settings)["metrics"]["bbox"]["AP"] == 0.5
    assert ablations.finished(tmp_path, "fpn", 0, {**settings, "iterations": 300}) is None  # stale: run again
    assert ablations.finished(tmp_path, "fpn", 1, settings) is None


def test_summary_gives_mean_and_sample_std_over_seeds_and_the_table3_gain(ablations):
    settings = {"iterations": 10}
    records = [fake_record(ablations, "fpn", s, m, b, settings) for s, m, b in ((0, 0.40, 0.50), (1, 0.44, 0.56), (2, 0.42, 0.53))]
    records += [fake_record(ablations, "faster_fpn", s, None, b, settings) for s, b in ((0, 0.48), (2, 0.50))]
    summary = ablations.summarize(records)
    mask_ap = summary["arms"]["fpn"]["mask_AP"]
    assert mask_ap["values"] == pytest.approx([40.0, 44.0, 42.0]) and mask_ap["mean"] == pytest.approx(42.0)
    assert mask_ap["std"] == pytest.approx(2.0)  # sqrt((4 + 4 + 0) / (3 - 1))
    assert summary["arms"]["fpn"]["mask_AP75"]["mean"] == pytest.approx(32.0)
    assert "mask_AP" not in summary["arms"]["faster_fpn"]
    assert summary["arms"]["faster_fpn"]["box_AP"]["std"] == pytest.approx(math.sqrt(2.0))
    gain = summary["table3"]["box_AP_gain_per_seed"]  # paired by seed: seeds 0 and 2 only
    assert gain["values"] == pytest.approx([2.0, 3.0]) and gain["mean"] == pytest.approx(2.5)
    assert summary["table3"]["paper_box_AP"]["mask_rcnn"]["AP"] == 38.2
    rows = {row["arm"]: row for row in summary["tables"]["2c"]["rows"]}
    assert not rows["c4_pool"]["ran"] and rows["c4_pool"]["paper"]["mask"]["AP"] == 26.9
    assert summary["tables"]["3"]["rows"][0]["ran"]
    with pytest.raises(ValueError):
        ablations.spread([])


# ----------------------------------------------------------------------------------------
# One arm, end to end


def tiny_sweep(tmp_path, arm: str, seed: int) -> tuple[list[str], object, object]:
    """The command line of one (arm, seed) run at a tiny budget, its output folder and results file."""
    out, results = tmp_path / "runs", tmp_path / "results" / "ablations.json"
    argv = ["--arms", arm, "--seeds", str(seed), "--iterations", "2", "--batch-size", "2", "--warmup", "1",
            "--num-train", "6", "--num-val", "3", "--processes", "1", "--output-dir", str(out),
            "--results", str(results)]  # fmt: skip
    return argv, out, results


@pytest.mark.slow
def test_one_arm_end_to_end_writes_a_record_and_is_skipped_the_second_time(ablations, tmp_path, capsys):
    argv, out, results = tiny_sweep(tmp_path, "faster_fpn", 3)
    assert ablations.main(argv) == 0
    record = json.loads(ablations.record_path(out, "faster_fpn", 3).read_text())
    assert (record["arm"], record["seed"], record["steps"]) == ("faster_fpn", 3, 2)
    assert record["config"]["mask"] is False and "segm" not in record["metrics"]
    assert 0 <= record["metrics"]["bbox"]["AP"] <= 1 and record["train_seconds"] > 0
    assert record["settings"]["iterations"] == 2 and len(record["load_average_after"]) == 3
    summary = json.loads(results.read_text())
    assert summary["arms"]["faster_fpn"]["seeds"] == [3]
    assert summary["table3"]["faster_rcnn"]["AP"]["values"] == [pytest.approx(100 * record["metrics"]["bbox"]["AP"])]
    assert summary["missing_runs"] == [] and "torch" in summary["machine"]
    assert "Table 3" in results.with_suffix(".md").read_text()
    written = ablations.record_path(out, "faster_fpn", 3).stat().st_mtime_ns
    capsys.readouterr()
    assert ablations.main(argv) == 0  # everything is there: nothing runs again
    assert "0 runs to do, 1 already finished" in capsys.readouterr().out
    assert ablations.record_path(out, "faster_fpn", 3).stat().st_mtime_ns == written


def test_the_other_readings_of_softmax_masks(ablations):
    import torch

    from mrcnn.config import shapes_small
    from mrcnn.model import MaskRCNN

    torch.manual_seed(0)
    model = MaskRCNN(shapes_small().replace(mask_loss="softmax")).eval()
    features = [torch.randn(1, 64, 32 // 2**level, 32 // 2**level) for level in range(4)]  # P2..P5 of a 128 x 128 image
    detections = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1, 3]),
                   "scores": torch.tensor([0.9, 0.8])}]  # fmt: skip
    with torch.no_grad():
        library = model.mask_branch.predict(features, detections)[0]["masks"]  # [D, 1, M, M]
        logits = model.mask_branch.mask_logits(features, [detections[0]["boxes"]])  # [D, K, M, M]
        readings = {}
        for reading in ablations.SOFTMAX_READINGS:
            with ablations.softmax_mask_reading(model, reading):
                readings[reading] = model.mask_branch.predict(features, detections)[0]["masks"]
    own = torch.stack([logits[d, k] for d, k in enumerate((1, 3))])[:, None]  # [D, 1, M, M]: m_k
    two_way = (own - logits[:, :1]).sigmoid()
    p_k = torch.stack([logits[d].softmax(0)[k] for d, k in enumerate((1, 3))])[:, None]
    torch.testing.assert_close(readings["segm_two_way"], two_way)
    torch.testing.assert_close(readings["segm_p_k"], p_k)
    # the library: the pixel is class k's where k wins; that keeps at least what p_k > 1/2 keeps,
    # and at most what k against the background alone keeps
    wins = torch.stack([logits[d].argmax(0) == k for d, k in enumerate((1, 3))])[:, None]
    assert torch.equal(library > 0.5, wins)
    assert ((p_k > 0.5) <= (library > 0.5)).all() and ((library > 0.5) <= (two_way > 0.5)).all()
    assert model.mask_branch.predict(features, detections)[0]["masks"].equal(library)  # restored on exit


@pytest.mark.slow
def test_rescoring_reads_an_older_softmax_run_by_the_winning_class_and_keeps_what_it_had(ablations, tmp_path, capsys):
    argv, out, results = tiny_sweep(tmp_path, "fpn_softmax", 1)
    assert ablations.main(argv) == 0
    path = ablations.record_path(out, "fpn_softmax", 1)
    record = json.loads(path.read_text())
    scored = record["metrics"]
    assert set(ablations.SOFTMAX_READINGS) <= set(scored) and not ablations.needs_rescoring(record)
    # a record as the code before wrote it: "segm" was the p_k > 1/2 reading, and there was no "segm_p_k"
    old = {k: v for k, v in scored.items() if k != "segm_p_k"} | {"segm": scored["segm_p_k"]}
    path.write_text(json.dumps({**record, "metrics": old}))
    assert ablations.needs_rescoring(json.loads(path.read_text()))
    capsys.readouterr()
    assert ablations.main(argv + ["--rescore"]) == 0
    assert "1 runs scored again" in capsys.readouterr().out
    rescored = json.loads(path.read_text())
    assert rescored["metrics"] == scored  # the same checkpoint read the same ways
    assert rescored["rescored"]["previous_metrics"] == old and "commit" in rescored["rescored"]["code"]
    summary = json.loads(results.read_text())
    assert summary["arms"]["fpn_softmax"]["mask_p_k_AP"]["values"] == [pytest.approx(100 * scored["segm_p_k"]["AP"])]
    assert "p_k > 1/2" in results.with_suffix(".md").read_text()
    assert ablations.main(argv + ["--rescore"]) == 0  # nothing left to score again
    assert "0 runs scored again" in capsys.readouterr().out
