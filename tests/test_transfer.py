"""experiments/transfer.py: the fine-tuning experiment's machinery at a tiny budget (two steps, a
few images, one seed): records are written, the fine-tuned arm names the re-initialised class
layers, a finished run is skipped, an unfinished one resumes at its missing point, and the summary's
statistics and paired differences."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def transfer():
    spec = importlib.util.spec_from_file_location("transfer", ROOT / "experiments" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["transfer"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["transfer"]


def tiny_argv(out: Path, results: Path) -> list[str]:
    return ["--seeds", "3", "--steps", "1", "2", "--batch-size", "2", "--warmup", "1", "--num-train", "2",
            "--num-val", "2", "--pretrain-iterations", "2", "--pretrain-batch-size", "2", "--num-pretrain-train", "4",
            "--num-pretrain-val", "2", "--processes", "1", "--output-dir", str(out), "--results", str(results)]  # fmt: skip


def test_tiny_experiment_writes_records_and_skips_them_the_second_time(transfer, tmp_path, capsys, monkeypatch):
    out, results = tmp_path / "runs", tmp_path / "results" / "transfer.json"
    assert transfer.main(tiny_argv(out, results)) == 0
    assert "3 runs to do, 0 already finished" in capsys.readouterr().out
    for arm in transfer.ARMS:
        record = json.loads(transfer.record_path(out, arm, 3).read_text())
        assert record["finished"] and (record["arm"], record["seed"]) == (arm, 3)
        assert [p["step"] for p in record["points"]] == [1, 2]
        assert all(0 <= p["metrics"]["segm"]["AP"] <= 1 for p in record["points"])
        assert record["config"]["num_classes"] == 2 and len(record["load_average_after"]) == 3
    pretrained = json.loads(transfer.record_path(out, "fine_tuned", 3).read_text())["pretrained"]
    assert pretrained["kind"] == "mrcnn checkpoint" and pretrained["unused"] == []
    assert sorted({key.rsplit(".", 1)[0] for key in pretrained["reinitialised"]}) == [
        "box_branch.predictor.box_deltas", "box_branch.predictor.class_logits", "mask_branch.predictor.mask_logits"]  # fmt: skip
    assert "pretrained" not in json.loads(transfer.record_path(out, "from_scratch", 3).read_text())

    summary = json.loads(results.read_text())
    assert summary["missing_runs"] == [] and summary["settings"]["seeds"] == [3]
    assert summary["pretrain"]["settings"]["iterations"] == 2 and "torch" in summary["machine"]
    assert summary["command"] == "python experiments/transfer.py " + " ".join(tiny_argv(out, results))
    assert set(summary["arms"]) == set(transfer.ARMS) and set(summary["arms"]["fine_tuned"]["by_step"]) == {"1", "2"}
    assert summary["fine_tuned_minus_from_scratch"]["2"]["mask_AP"]["n"] == 1
    assert summary["reinitialised"] == pretrained["reinitialised"]
    assert "| 2 |" in results.with_suffix(".md").read_text()

    written = {arm: transfer.record_path(out, arm, 3).stat().st_mtime_ns for arm in transfer.ARMS}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("mrcnn.train.train", no_training)
    assert transfer.main(tiny_argv(out, results)) == 0  # everything is there: nothing runs again
    assert "0 runs to do, 3 already finished" in capsys.readouterr().out
    assert {arm: transfer.record_path(out, arm, 3).stat().st_mtime_ns for arm in transfer.ARMS} == written


def test_an_unfinished_run_resumes_at_its_missing_point(transfer, tmp_path, capsys):
    out, results = tmp_path / "runs", tmp_path / "results" / "transfer.json"
    argv = tiny_argv(out, results)
    assert transfer.main(argv) == 0
    path = transfer.record_path(out, "from_scratch", 3)
    record = json.loads(path.read_text())
    first = record["points"][0]
    path.write_text(json.dumps({**record, "finished": False, "points": [first]}))  # as if stopped after step 1
    capsys.readouterr()
    assert transfer.main(argv) == 0
    assert "1 runs to do, 2 already finished" in capsys.readouterr().out
    resumed = json.loads(path.read_text())
    assert resumed["finished"] and [p["step"] for p in resumed["points"]] == [1, 2]
    assert resumed["points"][0] == first  # the recorded point is kept, not recomputed
    assert resumed["points"][1]["metrics"] == record["points"][1]["metrics"]  # the checkpoint at step 2, scored again


def test_a_record_of_other_settings_is_stale(transfer, tmp_path):
    settings = {"steps": [1, 2], "batch_size": 2}
    path = tmp_path / "result.json"
    assert transfer.finished(path, settings) is None
    path.write_text('{"arm": "fine_tuned", "se')  # a torn write
    assert transfer.read_record(path, settings) is None
    path.write_text(json.dumps({"settings": settings, "finished": False, "points": []}))
    assert transfer.read_record(path, settings) is not None and transfer.finished(path, settings) is None
    path.write_text(json.dumps({"settings": settings, "finished": True, "points": []}))
    assert transfer.finished(path, settings) is not None
    assert transfer.finished(path, {**settings, "batch_size": 4}) is None


def test_summary_gives_mean_sample_std_and_paired_differences(transfer):
    def record(arm, seed, masks):
        return {"arm": arm, "seed": seed, "points": [{"step": step, "metrics": {"segm": {"AP": m, "AP50": m + 0.1},
                                                                                "bbox": {"AP": m + 0.05}}}
                                                     for step, m in zip((10, 20), masks)]}  # fmt: skip

    records = [record("fine_tuned", 0, (0.30, 0.50)), record("fine_tuned", 1, (0.34, 0.54)),
               record("from_scratch", 0, (0.10, 0.20)), record("from_scratch", 1, (0.10, 0.30))]  # fmt: skip
    summary = transfer.summarize(records, [10, 20])
    fine = summary["arms"]["fine_tuned"]["by_step"]["10"]["mask_AP"]
    assert fine["mean"] == pytest.approx(32.0) and fine["std"] == pytest.approx(2 ** 0.5 * 2.0)  # sample std (n - 1)
    assert summary["arms"]["from_scratch"]["by_step"]["20"]["box_AP"]["mean"] == pytest.approx(30.0)
    difference = summary["fine_tuned_minus_from_scratch"]["20"]["mask_AP"]
    assert difference["values"] == pytest.approx([30.0, 24.0]) and difference["mean"] == pytest.approx(27.0)
