"""Identity bookkeeping of the runtime tracker: birth, keep, miss, death, duplicates, no resurrection."""

import pytest
import torch
from torchvision.ops import box_iou, nms
from tracking_testing import random_boxes

from ddetr_video.runtime_tracker import RuntimeTracker, pairwise_iou


def _box(x, y, s=10.0):
    return [x, y, x + s, y + s]


def _boxes(*xy):
    return torch.tensor([_box(x, y) for x, y in xy], dtype=torch.float32).reshape(-1, 4)


def _empty():
    return torch.zeros(0), torch.zeros(0, 4)


def test_birth_only_over_threshold_and_ids_increase():
    tr = RuntimeTracker(birth_threshold=0.5, keep_threshold=0.4, max_age=3, duplicate_iou=0.7)
    up = tr.update(*_empty(), torch.tensor([0.9, 0.49, 0.6]), _boxes((0, 0), (50, 50), (100, 100)))
    # births sorted by score: query 0 (0.9) then query 2 (0.6); 0.49 is below the threshold
    assert up.births.tolist() == [0, 2]
    assert up.ids.tolist() == [1, 2]
    assert up.visible.tolist() == [True, True]
    assert len(tr) == 2


def test_keep_miss_and_death_after_max_age():
    tr = RuntimeTracker(birth_threshold=0.5, keep_threshold=0.4, max_age=2, duplicate_iou=0.7)
    tr.update(*_empty(), torch.tensor([0.9, 0.8]), _boxes((0, 0), (100, 100)))
    tb = _boxes((0, 0), (100, 100))
    no_det = (torch.zeros(0), torch.zeros(0, 4))
    # frame 2: track 0 kept, track 1 misses once (still alive, not visible)
    up = tr.update(torch.tensor([0.45, 0.1]), tb, *no_det)
    assert up.keep.tolist() == [0, 1] and up.ids.tolist() == [1, 2]
    assert up.visible.tolist() == [True, False]
    # frame 3: track 1 recovers -> miss counter resets
    up = tr.update(torch.tensor([0.45, 0.5]), tb, *no_det)
    assert up.visible.tolist() == [True, True] and tr.misses.tolist() == [0, 0]
    # frames 4, 5: track 1 misses twice -> dies at the second miss
    up = tr.update(torch.tensor([0.9, 0.2]), tb, *no_det)
    assert up.ids.tolist() == [1, 2] and up.dead_ids.numel() == 0
    up = tr.update(torch.tensor([0.9, 0.3]), tb, *no_det)
    assert up.keep.tolist() == [0] and up.ids.tolist() == [1] and up.dead_ids.tolist() == [2]


def test_duplicate_suppression_against_tracks_and_other_births():
    tr = RuntimeTracker(birth_threshold=0.5, keep_threshold=0.4, max_age=5, duplicate_iou=0.5)
    tr.update(*_empty(), torch.tensor([0.9]), _boxes((0, 0)))
    # det 0 duplicates the live track, det 1 and det 2 duplicate each other (det 2 scores higher)
    dets = _boxes((1, 0), (60, 60), (61, 60), (200, 200))
    up = tr.update(torch.tensor([0.8]), _boxes((0, 0)), torch.tensor([0.95, 0.7, 0.8, 0.6]), dets)
    assert up.births.tolist() == [2, 3]
    assert up.ids.tolist() == [1, 2, 3]
    assert len(set(up.ids.tolist())) == len(up.ids)


def test_invisible_track_still_suppresses_births():
    tr = RuntimeTracker(birth_threshold=0.5, keep_threshold=0.4, max_age=5, duplicate_iou=0.5)
    tr.update(*_empty(), torch.tensor([0.9]), _boxes((0, 0)))
    up = tr.update(torch.tensor([0.1]), _boxes((0, 0)), torch.tensor([0.9]), _boxes((0, 0)))
    assert up.births.numel() == 0 and up.visible.tolist() == [False]


def test_duplicate_track_is_hidden_counts_misses_and_comes_back():
    tr = RuntimeTracker(keep_threshold=0.4, max_age=3, duplicate_iou=0.5, track_duplicate_iou=0.5)
    tr.update(*_empty(), torch.tensor([0.9, 0.8, 0.7]), _boxes((0, 0), (100, 0), (200, 0)))
    # track 2 converges on track 1 (IoU ~0.9); track 3 overlaps nobody
    tb = _boxes((0, 0), (1, 0), (200, 0))
    up = tr.update(torch.tensor([0.6, 0.9, 0.7]), tb, *_empty())
    assert up.visible.tolist() == [False, True, True] and tr.misses.tolist() == [1, 0, 0]
    # they separate again: the hidden track is visible, with its id, and its miss counter resets
    up = tr.update(torch.tensor([0.6, 0.9, 0.7]), _boxes((0, 0), (100, 0), (200, 0)), *_empty())
    assert up.visible.tolist() == [True, True, True] and up.ids.tolist() == [1, 2, 3]
    assert tr.misses.tolist() == [0, 0, 0]
    # a duplicate for max_age frames dies; the higher-scoring one lives on
    for _ in range(3):
        up = tr.update(torch.tensor([0.6, 0.9, 0.7])[: len(tr)], tb[: len(tr)], *_empty())
    assert up.ids.tolist() == [2, 3] and up.dead_ids.tolist() == [1]


def test_track_duplicates_greedy_by_score_and_off_by_default():
    # A > B > C in score; A~B and B~C overlap but A and C do not: B is hidden, C stays (as NMS)
    boxes = _boxes((0, 0), (3, 0), (6, 0))
    scores = torch.tensor([0.9, 0.8, 0.7])
    on = RuntimeTracker(max_age=5, duplicate_iou=0.99, track_duplicate_iou=0.5)
    off = RuntimeTracker(max_age=5, duplicate_iou=0.99)
    for tr in (on, off):
        tr.update(*_empty(), scores, boxes)
    assert on.update(scores, boxes, *_empty()).visible.tolist() == [True, False, True]
    assert off.update(scores, boxes, *_empty()).visible.tolist() == [True, True, True]


def test_no_resurrection_and_unique_ids_on_random_streams():
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        tr = RuntimeTracker(birth_threshold=0.6, keep_threshold=0.4, max_age=1 + trial % 4, duplicate_iou=0.3)
        seen_dead, max_id = set(), 0
        misses_ref = {}
        for _ in range(25):
            T = len(tr)
            ids_before = tr.ids.tolist()
            ts = torch.rand(T, generator=g)
            tb = torch.rand(T, 2, generator=g) * 200
            tb = torch.cat([tb, tb + 10], 1)
            Q = int(torch.randint(0, 6, (1,), generator=g))
            ds = torch.rand(Q, generator=g)
            db = torch.rand(Q, 2, generator=g) * 200
            db = torch.cat([db, db + 10], 1)
            up = tr.update(ts, tb, ds, db)
            # independent reference of keep/death from the miss counters
            exp_keep = []
            for i, tid in enumerate(ids_before):
                m = 0 if ts[i] >= 0.4 else misses_ref.get(tid, 0) + 1
                misses_ref[tid] = m
                if m < tr.max_age:
                    exp_keep.append(i)
            assert up.keep.tolist() == exp_keep
            ids = up.ids.tolist()
            assert len(set(ids)) == len(ids), "duplicate ids among live tracks"
            assert not (set(ids) & seen_dead), "a dead id came back"
            new = ids[len(exp_keep) :]
            assert all(n > max_id for n in new), "new ids must be fresh"
            max_id = max([max_id] + new)
            seen_dead |= set(up.dead_ids.tolist())
            assert set(up.dead_ids.tolist()) == set(ids_before) - set(ids)


def test_pairwise_iou_equals_torchvision_box_iou():
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(30, 2, generator=g) * 50
    b = torch.cat([xy, xy + torch.rand(30, 2, generator=g) * 30], 1)
    b[3] = b[4]  # identical boxes: IoU exactly 1
    b[5, 2:] = b[5, :2]  # a degenerate (zero-area) box: IoU 0 with the others
    got = torch.from_numpy(pairwise_iou(b.numpy()))
    ref = box_iou(b, b)
    assert got[3, 4] == 1.0
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("detect_sees", ["all", "shown", "none"])
def test_births_and_track_duplicates_equal_torchvision_nms_on_random_frames(detect_sees):
    """The greedy suppressions (births among themselves, duplicate tracks) against torchvision's ``nms`` on
    crowded random frames (distinct scores, so the greedy order is unique), and the births' overlap with the
    kept tracks against a brute-force check: ``unseen_track_iou`` for the tracks hidden from the detect
    queries this frame, ``duplicate_iou`` for the others."""
    g = torch.Generator().manual_seed(1)

    for trial in range(40):
        T, Q = int(torch.randint(0, 12, (1,), generator=g)), int(torch.randint(0, 25, (1,), generator=g))
        tr = RuntimeTracker(
            0.3,
            0.25,
            max_age=3,
            duplicate_iou=0.2 + 0.05 * (trial % 10),
            track_duplicate_iou=0.4,
            detect_sees=detect_sees,
            unseen_track_iou=0.05 + 0.02 * (trial % 5),
        )
        misses_before = torch.randint(0, 2, (T,), generator=g)
        tr.ids, tr.misses, tr.next_id = torch.arange(1, T + 1), misses_before.clone(), T + 1
        hidden = {"all": torch.zeros(T, dtype=torch.bool), "shown": misses_before > 0}.get(
            detect_sees, torch.ones(T, dtype=torch.bool)
        )
        on_thr = torch.where(hidden, torch.tensor(tr.unseen_track_iou), torch.tensor(tr.duplicate_iou))
        ts, tb = torch.rand(T, generator=g), random_boxes(g, T)
        ds, db = torch.rand(Q, generator=g), random_boxes(g, Q)
        up = tr.update(ts, tb, ds, db)

        visible = torch.nonzero(ts >= 0.25).flatten()
        not_dup = set(visible[nms(tb[visible], ts[visible], 0.4)].tolist())
        hit = [i in not_dup for i in range(T)]
        assert up.visible[: up.keep.numel()].tolist() == [hit[i] for i in up.keep.tolist()]

        kept_boxes = tb[up.keep]
        cand = torch.nonzero(ds >= 0.3).flatten()
        kept_thr = on_thr[up.keep].to(torch.float32)
        free = [
            q
            for q in cand.tolist()
            if kept_boxes.numel() == 0 or (box_iou(db[q : q + 1], kept_boxes)[0] <= kept_thr).all()
        ]
        free = torch.as_tensor(free, dtype=torch.int64)
        expected = free[nms(db[free], ds[free], tr.duplicate_iou)] if free.numel() else free
        assert up.births.tolist() == expected.tolist(), trial


def test_bad_shapes_raise():
    tr = RuntimeTracker()
    try:
        tr.update(torch.zeros(2), torch.zeros(2, 4), torch.zeros(1), torch.zeros(1, 4))
    except ValueError as e:
        assert "live tracks" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_rebind_missed_track_takes_the_detection_and_keeps_its_id():
    on = RuntimeTracker(
        birth_threshold=0.5, keep_threshold=0.4, max_age=5, duplicate_iou=0.5, rebind_missed=True
    )
    off = RuntimeTracker(birth_threshold=0.5, keep_threshold=0.4, max_age=5, duplicate_iou=0.5)
    for tr in (on, off):
        tr.update(*_empty(), torch.tensor([0.9, 0.8]), _boxes((0, 0), (100, 100)))
    # track 1 (slot 0) misses; detection 1 overlaps it, detection 0 is a new object
    args = (
        torch.tensor([0.1, 0.9]),
        _boxes((0, 0), (100, 100)),
        torch.tensor([0.7, 0.8]),
        _boxes((50, 50), (1, 1)),
    )
    up = on.update(*args)
    assert up.rebound.tolist() == [1, -1] and up.births.tolist() == [0]
    assert up.ids.tolist() == [1, 2, 3] and up.visible.tolist() == [True, True, True]
    assert up.sources(2).tolist() == [2 + 1, 1, 2 + 0]
    assert on.misses.tolist() == [0, 0, 0]
    up = off.update(*args)  # without it: the detection is a duplicate of the missed track, suppressed
    assert up.rebound.tolist() == [-1, -1] and up.births.tolist() == [0]
    assert up.visible.tolist() == [False, True, True] and up.sources(2).tolist() == [0, 1, 2]


def test_rebind_needs_a_missed_track_and_no_visible_overlap():
    tr = RuntimeTracker(
        birth_threshold=0.5, keep_threshold=0.4, max_age=5, duplicate_iou=0.5, rebind_missed=True
    )
    # two live tracks (ids 1, 2) that converged on one object
    tr.ids, tr.misses, tr.next_id = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int64), 3
    # slot 1 is missed but slot 0, visible, also covers the detection: a plain duplicate
    up = tr.update(torch.tensor([0.9, 0.1]), _boxes((0, 0), (1, 0)), torch.tensor([0.9]), _boxes((0, 1)))
    assert up.rebound.tolist() == [-1, -1] and up.births.numel() == 0
    assert up.visible.tolist() == [True, False]
    # a detection under the birth threshold re-binds nothing
    up = tr.update(torch.tensor([0.1, 0.1]), _boxes((0, 0), (100, 0)), torch.tensor([0.49]), _boxes((0, 0)))
    assert up.rebound.tolist() == [-1, -1] and up.visible.tolist() == [False, False]


def test_rebind_rescues_a_track_at_its_last_miss_and_takes_the_best_detection():
    tr = RuntimeTracker(
        birth_threshold=0.5, keep_threshold=0.4, max_age=2, duplicate_iou=0.5, rebind_missed=True
    )
    tr.update(*_empty(), torch.tensor([0.9]), _boxes((0, 0)))
    tr.update(torch.tensor([0.1]), _boxes((0, 0)), *_empty())  # first miss
    # second miss would kill it (max_age 2); two overlapping detections: the higher-scoring one re-binds,
    # the other is a duplicate of it
    up = tr.update(torch.tensor([0.1]), _boxes((0, 0)), torch.tensor([0.6, 0.9]), _boxes((1, 0), (0, 1)))
    assert up.dead_ids.numel() == 0 and up.ids.tolist() == [1]
    assert up.rebound.tolist() == [1] and up.births.numel() == 0 and up.visible.tolist() == [True]


def test_rebind_invariants_on_random_frames():
    """Brute-force checks of every re-binding decision on crowded random frames, and: with nothing to
    re-bind, the same update as without the option."""
    g = torch.Generator().manual_seed(4)

    n_rebound = 0
    for trial in range(60):
        T, Q = int(torch.randint(0, 10, (1,), generator=g)), int(torch.randint(0, 20, (1,), generator=g))
        kw = dict(birth_threshold=0.3, keep_threshold=0.5, max_age=2, duplicate_iou=0.3 + 0.05 * (trial % 6))
        on, off = RuntimeTracker(**kw, rebind_missed=True), RuntimeTracker(**kw)
        misses = torch.randint(0, 2, (T,), generator=g)
        for tr in (on, off):
            tr.ids, tr.misses, tr.next_id = torch.arange(1, T + 1), misses.clone(), T + 1
        ts, tb = torch.rand(T, generator=g), random_boxes(g, T)
        ds, db = torch.rand(Q, generator=g), random_boxes(g, Q)
        up, ref = on.update(ts, tb, ds, db), off.update(ts, tb, ds, db)
        thr = on.duplicate_iou
        shown = tb[ts >= 0.5]
        pairs = [(k, q) for k, q in zip(up.keep.tolist(), up.rebound.tolist()) if q >= 0]
        n_rebound += len(pairs)
        for k, q in pairs:
            assert ts[k] < 0.5 and ds[q] >= 0.3, "only a missed track, only a would-be birth"
            assert box_iou(db[q : q + 1], tb[k : k + 1]).item() > thr
            assert shown.numel() == 0 or box_iou(db[q : q + 1], shown).max() <= thr
        taken = [q for _, q in pairs]
        if len(taken) > 1:
            iou = box_iou(db[taken], db[taken]) - torch.eye(len(taken)) * 2
            assert iou.max() <= thr, "two re-bound detections overlap"
        assert not set(taken) & set(up.births.tolist())
        blockers = torch.cat([tb[up.keep], db[taken]])
        for q in up.births.tolist():
            assert blockers.numel() == 0 or box_iou(db[q : q + 1], blockers).max() <= thr
        assert up.visible[: up.keep.numel()].tolist() == [
            bool(ts[k] >= 0.5) or q >= 0 for k, q in zip(up.keep.tolist(), up.rebound.tolist())
        ]
        if not pairs:
            for name in ("keep", "births", "ids", "visible", "dead_ids", "rebound"):
                assert torch.equal(getattr(up, name), getattr(ref, name)), (trial, name)
    assert n_rebound > 10, "the random frames must exercise re-binding"


def test_rebind_never_gives_one_object_to_two_missed_tracks():
    tr = RuntimeTracker(
        birth_threshold=0.5, keep_threshold=0.4, max_age=5, duplicate_iou=0.5, rebind_missed=True
    )
    tr.ids, tr.misses, tr.next_id = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int64), 3
    # both tracks missed and overlapping each other; the two detections overlap each other (IoU 0.68) and
    # each overlaps both tracks: only the better detection re-binds (to the first of the equally close tracks)
    up = tr.update(
        torch.tensor([0.1, 0.1]), _boxes((0, 0), (2, 0)), torch.tensor([0.9, 0.8]), _boxes((1, 0), (2, 1))
    )
    assert up.rebound.tolist() == [0, -1] and up.births.numel() == 0
    assert up.visible.tolist() == [True, False]
