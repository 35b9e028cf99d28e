"""Features per image as a curve: the best n of an extraction are the extraction of n, tables
derived by keeping them, and `evaluate --max-features N... --seed S...` in one command."""

import json

import numpy as np
import pytest

from delf_index.errors import UserError
from delf_index.pipelines import evaluate
from delf_index.pipelines.cli import main
from delf_index.runtime import tables
from delf_index.runtime.extractor import Extractor
from tests.conftest import ONE_WORKER, rgb


@pytest.mark.parametrize("selection", ["score", "levels"])
def test_best_n_of_an_extraction_are_the_extraction_of_n(photos, default_extractor, selection):
    """What `curve` and `tables.derive` rely on: features come best first, so keeping the
    first n is extracting with max_features n, NMS on or off, whatever the selection."""
    image = rgb(photos["coffee"])
    for nms_iou in (None, 0.8):
        conf = {"nms_iou": nms_iou, "selection": selection}
        many = Extractor(engine=default_extractor.engine, conf={**conf, "max_features": 600})(image)
        for n in (300, 50):
            few = Extractor(engine=default_extractor.engine, conf={**conf, "max_features": n})(image)
            best = many.take(slice(n))
            assert len(few) == n
            for key in ("x", "y", "scale", "attention", "descriptors"):
                np.testing.assert_array_equal(getattr(best, key), getattr(few, key), err_msg=f"{key}, nms {nms_iou}")


def test_levels_selection_keeps_every_level_its_share(photos, default_extractor):
    """selection "levels": every level keeps its k best before any level its (k+1)-th, each
    level's features in score order; "score" keeps the best over the whole pyramid."""
    image = rgb(photos["astronaut"])
    score = Extractor(engine=default_extractor.engine, conf={"max_features": 100000})(image)
    levels = Extractor(engine=default_extractor.engine, conf={"max_features": 350, "selection": "levels"})(image)
    available = {s: int((score.scale == s).sum()) for s in np.unique(score.scale)}
    kept = {s: int((levels.scale == s).sum()) for s in available}
    share = min(kept[s] for s in available if kept[s] < available[s])  # levels not exhausted
    assert all(kept[s] in (share, share + 1) or kept[s] == available[s] for s in available), (kept, available)
    for s in available:  # a level's kept features are its best, in score order
        mine = levels.attention[levels.scale == s]
        assert np.array_equal(mine, score.attention[score.scale == s][: len(mine)])
    assert not np.array_equal(score.take(slice(350)).scale, levels.scale)


def test_curve_derives_each_number_once_and_reports_it(evaluated, corpus, tmp_path, capsys):
    work, _ = evaluated
    source = str(work / "features")
    out = tmp_path / "curve"
    args = ["evaluate", "--images", str(corpus / "images"), "--groups", str(corpus / "groups.csv"), "--workdir",
            str(out), "--features", source, "--max-features", "300", "100", "--seed", "0", "--no-ablation",
            "--workers", "1"]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((out / "eval" / "curve.json").read_text())
    assert [r["max_features"] for r in rows] == [300, 100]
    assert all(len(r["mAP_per_seed"]) == 1 for r in rows)
    assert rows[0]["bytes_per_image"] > rows[1]["bytes_per_image"]
    assert rows[0]["features_per_image"] <= 300 and rows[1]["features_per_image"] <= 100  # the source holds 1000
    assert "| 100 |" in (out / "eval" / "curve.md").read_text()
    # the smaller number's table: every image's first 100 features of the source, nothing else
    derived = dict(tables.iter_features(str(out / "n100" / "features")))
    original = dict(tables.iter_features(source))
    assert derived.keys() == original.keys()
    for image_id, features in original.items():
        np.testing.assert_array_equal(derived[image_id].descriptors, features.descriptors[:100])
        np.testing.assert_array_equal(derived[image_id].x, features.x[:100])
    assert tables.snapshot(str(out / "n100" / "features")).properties["extractor"]["max_features"] == 100
    # a second seed: only its point is measured; nothing derived again, no point measured again
    version = tables.snapshot(str(out / "n100" / "features")).version
    points = sorted(out.glob("n*/seed*/eval/metrics.json"))
    assert len(points) == 2
    measured = {p: p.stat().st_mtime_ns for p in points}
    rows = evaluate.curve(str(corpus / "images"), str(out), (100,), (0, 1), groups=str(corpus / "groups.csv"),
                          conf={"ablation": False}, beam_options=ONE_WORKER, features=source)  # fmt: skip
    assert len(rows[0]["mAP_per_seed"]) == 2 and abs(rows[0]["mAP"] - np.mean(rows[0]["mAP_per_seed"])) < 1e-4
    assert tables.snapshot(str(out / "n100" / "features")).version == version
    assert {p: p.stat().st_mtime_ns for p in points} == measured
    assert "curve:" in capsys.readouterr().out
    with pytest.raises(UserError, match="extracted with 300 features per image: it cannot give 500"):
        evaluate.curve(
            str(corpus / "images"),
            str(out),
            (500,),
            (0,),
            groups=str(corpus / "groups.csv"),
            features=str(out / "n300" / "features"),
        )
