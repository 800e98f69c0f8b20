"""Identity bookkeeping of the runtime tracker: birth, keep, miss, death, duplicates, no resurrection."""

import torch
from torchvision.ops import box_iou, nms

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


def test_births_and_track_duplicates_equal_torchvision_nms_on_random_frames():
    """The greedy suppressions (births among themselves, duplicate tracks) against torchvision's ``nms`` on
    crowded random frames (distinct scores, so the greedy order is unique), and the births' overlap with the
    kept tracks against a brute-force check."""
    g = torch.Generator().manual_seed(1)

    def rand_boxes(n):
        xy = torch.rand(n, 2, generator=g) * 60
        return torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 20], 1)

    for trial in range(40):
        T, Q = int(torch.randint(0, 12, (1,), generator=g)), int(torch.randint(0, 25, (1,), generator=g))
        tr = RuntimeTracker(
            0.3, 0.25, max_age=3, duplicate_iou=0.2 + 0.05 * (trial % 10), track_duplicate_iou=0.4
        )
        tr.ids, tr.misses, tr.next_id = torch.arange(1, T + 1), torch.zeros(T, dtype=torch.int64), T + 1
        ts, tb = torch.rand(T, generator=g), rand_boxes(T)
        ds, db = torch.rand(Q, generator=g), rand_boxes(Q)
        up = tr.update(ts, tb, ds, db)

        visible = torch.nonzero(ts >= 0.25).flatten()
        not_dup = set(visible[nms(tb[visible], ts[visible], 0.4)].tolist())
        hit = [i in not_dup for i in range(T)]
        assert up.visible[: up.keep.numel()].tolist() == [hit[i] for i in up.keep.tolist()]

        kept_boxes = tb[up.keep]
        cand = torch.nonzero(ds >= 0.3).flatten()
        free = [
            q
            for q in cand.tolist()
            if kept_boxes.numel() == 0 or box_iou(db[q : q + 1], kept_boxes).max() <= tr.duplicate_iou
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
