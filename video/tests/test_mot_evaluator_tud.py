"""``compute_tracking_metrics`` on real MOTChallenge files: the TUD-Campus / TUD-Stadtmitte ground truth and
tracker results that ``motmetrics`` ships, scored by our evaluator and by motmetrics' own MOTChallenge
pipeline (``io.loadtxt`` + ``utils.compare_to_groundtruth``), and against the summary motmetrics' own test
suite expects for them (``motmetrics/tests/test_metrics.py::test_motchallenge_files``)."""

import os

import numpy as np
import pytest

mm = pytest.importorskip("motmetrics")

from ddetr_video.evaluator import SequenceGT, compute_tracking_metrics  # noqa: E402
from ddetr_video.mot_format import CLASS, read_mot_file  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(mm.__file__), "data")
SEQUENCES = ("TUD-Campus", "TUD-Stadtmitte")

# motmetrics' expected summary for these files (its test_motchallenge_files): IDF1, MOTA, IDSW, FP, FN
EXPECTED = {
    "TUD-Campus": dict(IDF1=55.7659, MOTA=52.6462, IDSW=7, FP=13, FN=150),
    "TUD-Stadtmitte": dict(IDF1=64.4619, MOTA=56.4014, IDSW=7, FP=45, FN=452),
    "OVERALL": dict(IDF1=62.4296, MOTA=55.5116, IDSW=14, FP=58, FN=602),
}


def _load(seq):
    # 2D MOT 2015 files: gt and results share the layout frame,id,x,y,w,h,conf,x,y,z (no class column),
    # so both are read as result rows; every gt row is a target of class 0.
    gt = read_mot_file(os.path.join(DATA_DIR, seq, "gt.txt"), "result").data.copy()
    gt[:, CLASS] = 0
    pred = read_mot_file(os.path.join(DATA_DIR, seq, "test.txt"), "result").data
    frames = np.unique(np.concatenate([gt[:, 0], pred[:, 0]]).astype(np.int64))
    return SequenceGT(frames, gt, np.zeros((0, 9))), pred


@pytest.fixture(scope="module")
def ours():
    loaded = {seq: _load(seq) for seq in SEQUENCES}
    gt = {seq: g for seq, (g, _) in loaded.items()}
    preds = {seq: p for seq, (_, p) in loaded.items()}
    overall, per_seq = compute_tracking_metrics(gt, preds, iou_threshold=0.5)
    return dict(per_seq, OVERALL=overall)


@pytest.fixture(scope="module")
def motmetrics_summary():
    """motmetrics' own pipeline on the same files, computed here (not copied)."""
    accs = []
    for seq in SEQUENCES:
        df_gt = mm.io.loadtxt(os.path.join(DATA_DIR, seq, "gt.txt"))
        df_test = mm.io.loadtxt(os.path.join(DATA_DIR, seq, "test.txt"))
        accs.append(mm.utils.compare_to_groundtruth(df_gt, df_test, "iou", distth=0.5))
    mh = mm.metrics.create()
    return mh.compute_many(
        accs, metrics=["idf1", "mota", "num_switches", "num_false_positives", "num_misses"],
        names=list(SEQUENCES), generate_overall=True,
    )  # fmt: skip


@pytest.mark.parametrize("name", [*SEQUENCES, "OVERALL"])
def test_matches_motmetrics_pipeline(ours, motmetrics_summary, name):
    row = motmetrics_summary.loc[name]
    got = ours[name]
    assert got["IDF1"] == pytest.approx(100 * row["idf1"], abs=1e-6)
    assert got["MOTA"] == pytest.approx(100 * row["mota"], abs=1e-6)
    assert got["IDSW"] == int(row["num_switches"])
    assert got["FP"] == int(row["num_false_positives"])
    assert got["FN"] == int(row["num_misses"])


@pytest.mark.parametrize("name", [*SEQUENCES, "OVERALL"])
def test_matches_motmetrics_expected_summary(ours, name):
    got, want = ours[name], EXPECTED[name]
    assert got["IDF1"] == pytest.approx(want["IDF1"], abs=1e-2)
    assert got["MOTA"] == pytest.approx(want["MOTA"], abs=1e-2)
    for key in ("IDSW", "FP", "FN"):
        assert got[key] == want[key], key


def test_hota_is_computed_on_real_files(ours):
    # HOTA lies between 0 and 100 and is no larger than sqrt(DetA * AssA) bounds allow: HOTA = sqrt(DetA*AssA)
    for name in SEQUENCES:
        got = ours[name]
        assert 0 < got["HOTA"] < 100
        assert got["HOTA"] == pytest.approx(np.sqrt(got["DetA"] * got["AssA"]), rel=0.05)
