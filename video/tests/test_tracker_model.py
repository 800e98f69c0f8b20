"""QueryTracker end to end on tiny inputs: clip mapper, a short training run, inference bookkeeping, demo."""

import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from tracking_testing import FadingTrackStandIn

from ddetr_d2.solver import build_optimizer
from ddetr_video.clip_mapper import ClipDatasetMapper, sample_clip_indices
from ddetr_video.config import get_tracker_cfg
from ddetr_video.datasets import register_synthetic_mot
from ddetr_video.demo import track_video
from ddetr_video.synthetic_video import SyntheticVideoConfig

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_tiny.yaml")
SMALL = SyntheticVideoConfig(num_frames=8, width=96, height=64, min_size=10, max_size=20, num_objects=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn_mot") / "data")
    names = register_synthetic_mot(root=root, cfg=SMALL, splits={"train": 2}, seed=3, prefix="test_trk_mot")
    yield names[0]
    for n in names:
        DatasetCatalog.remove(n)


def _cfg(*opts):
    return get_tracker_cfg(
        CONFIG,
        [
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "INPUT.MAX_SIZE_TRAIN",
            "96",
            "INPUT.MIN_SIZE_TEST",
            "64",
            "INPUT.MAX_SIZE_TEST",
            "96",
            "MODEL.DEFORMABLE_DETR.NUM_QUERIES",
            "8",
            *opts,
        ],
    )


def test_sample_clip_indices_properties():
    rng = np.random.RandomState(0)
    for _ in range(300):
        seq_len = int(rng.randint(1, 30))
        length, gap = int(rng.randint(1, 6)), int(rng.randint(1, 5))
        anchor = int(rng.randint(0, seq_len))
        pos = sample_clip_indices(anchor, seq_len, length, gap, rng)
        assert len(pos) == min(length, seq_len)
        assert all(0 <= p < seq_len for p in pos)
        d = np.diff(pos)
        assert (d >= 1).all() and (d <= gap).all()
        assert pos[0] <= anchor


def test_clip_mapper_consistent_augmentation(tiny_set):
    cfg = _cfg(
        "DATASETS.TRAIN",
        f"('{tiny_set}',)",
        "INPUT.CLIP_LENGTHS",
        "(3,)",
        "INPUT.CLIP_LENGTH_STEPS",
        "()",
        "INPUT.CLIP_MAX_INTERVAL",
        "2",
    )
    flip = ClipDatasetMapper(cfg, is_train=True, augmentations=[T.RandomFlip(prob=1.0)])
    frames = flip.sequences[next(iter(flip.sequences))]
    clip = flip(frames[1])["clip"]
    assert len(clip) == 3
    idx = [f["frame_idx"] for f in clip]
    assert idx[0] == 1 and all(1 <= b - a <= 2 for a, b in zip(idx, idx[1:]))
    by_idx = {d["frame_idx"]: d for d in frames}
    for f in clip:
        src = by_idx[f["frame_idx"]]
        img = cv2.imread(src["file_name"])[:, :, ::-1]
        # every frame flipped the same way (image and boxes)
        assert np.abs(f["image"].permute(1, 2, 0).numpy().astype(int) - img[:, ::-1].astype(int)).max() == 0
        W = src["width"]
        exp = {
            a["track_id"]: BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in src["annotations"]
        }
        inst = f["instances"]
        assert len(inst) == len(exp)
        for box, tid in zip(inst.gt_boxes.tensor.tolist(), inst.gt_track_ids.tolist()):
            x0, y0, x1, y1 = exp[tid]
            np.testing.assert_allclose(box, [W - x1, y0, W - x0, y1], atol=1e-4)


def test_short_training_run_decreases_loss_and_updates_weights(tiny_set):
    torch.manual_seed(0)
    cfg = _cfg(
        "DATASETS.TRAIN",
        f"('{tiny_set}',)",
        "INPUT.CLIP_LENGTHS",
        "(3,)",
        "INPUT.CLIP_LENGTH_STEPS",
        "()",
        "MODEL.TRACKER.TRAIN_TRACK_IOU",
        "0.0",  # a random model's boxes pass no IoU gate: without this no track (and no QIM) would train
        "MODEL.TRACKER.RANDOM_DROP",
        "0.0",
        "MODEL.TRACKER.FP_RATIO",
        "0.0",
        "SOLVER.BASE_LR",
        "0.001",
    )
    model = build_model(cfg)
    model.train()
    opt = build_optimizer(cfg, model)
    mapper = ClipDatasetMapper(cfg, is_train=True, augmentations=[])
    np.random.seed(0)
    clip = mapper(DatasetCatalog.get(tiny_set)[0])
    assert sum(len(f["instances"]) for f in clip["clip"]) > 0
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    history = []
    for _ in range(6):
        losses = model([clip])
        assert {"loss_ce", "loss_bbox", "loss_giou"} <= set(losses)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss))
    assert history[-1] < history[0], history
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    for prefix in (
        "backbone.",
        "transformer.encoder",
        "query_embed",
        "class_embed",
        "bbox_embed",
        "qim.",
        "detect_ref_wh",
    ):
        assert any(prefix in k for k in changed), f"no parameter named *{prefix}* was updated"


class _StaticDouble:
    """Deterministic stand-in for ``QueryTracker.frame_forward``: one static object at ``box`` (cxcywh).

    Track queries keep their reference box with score ~1; every detect query proposes the object (score ~1)
    with tiny jitter. A correct tracker must give the object one id for the whole video (births overlapping
    the live track are duplicates)."""

    def __init__(self, model, box):
        self.model, self.box = model, torch.tensor(box)
        self.calls = 0

    def __call__(self, images, tracks, hidden=None):
        m = self.model
        t_tgt, t_pos, t_ref = tracks
        T_, Q = t_tgt.shape[0], m.num_detect_queries
        logits = torch.full((T_ + Q, m.num_classes), -9.0)
        logits[:, 0] = 9.0
        det = self.box[None].repeat(Q, 1) + 0.002 * torch.arange(Q)[:, None]
        self.calls += 1
        C = m.hidden_dim
        return {
            "pred_logits": logits,
            "pred_boxes": torch.cat([t_ref, det]),
            "aux_outputs": [],
            "hs": torch.randn(T_ + Q, C),
            "tgt": torch.randn(T_ + Q, C),
            "query_pos": torch.randn(T_ + Q, C),
            "num_tracks": T_,
        }


def _write_video(path, n, size=(96, 64)):
    w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert w.isOpened()
    for i in range(n):
        f = np.full((size[1], size[0], 3), 40 + 10 * i, np.uint8)
        cv2.rectangle(f, (30, 20), (50, 40), (0, 0, 255), -1)
        w.write(f)
    w.release()


def test_track_video_static_object_keeps_one_id(tmp_path):
    cfg = _cfg()
    model = build_model(cfg)
    double = _StaticDouble(model, [40 / 96, 30 / 64, 20 / 96, 20 / 64])
    model.frame_forward = double
    video = str(tmp_path / "static.avi")
    _write_video(video, 7)
    txt = track_video(cfg, video, str(tmp_path / "out") + "/", 0.5, model=model)
    assert double.calls == 7
    assert os.path.isfile(txt) and txt.endswith(".txt")
    rows = np.loadtxt(txt, delimiter=",").reshape(-1, 10)
    assert rows[:, 0].tolist() == list(range(1, 8)), "one row per frame, frames 1-based"
    assert set(rows[:, 1].astype(int).tolist()) == {1}, "static object must keep id 1"
    np.testing.assert_allclose(rows[:, 2:6], np.tile([30, 20, 20, 20], (7, 1)), atol=1e-3)
    out_video = os.path.splitext(txt)[0] + ".mp4"
    if not os.path.isfile(out_video):
        out_video = os.path.splitext(txt)[0] + ".avi"
    cap = cv2.VideoCapture(out_video)
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 7, "annotated video must keep the frame count"


def test_track_state_resets_between_sequences():
    cfg = _cfg()
    model = build_model(cfg)
    model.frame_forward = _StaticDouble(model, [0.5, 0.5, 0.2, 0.2])
    model.eval()
    img = torch.zeros(3, 64, 96, dtype=torch.uint8)
    ids = []
    for seq in ("a", "b"):
        for i in range(3):
            out = model([{"image": img, "height": 64, "width": 96, "sequence": seq, "frame_idx": i}])
            ids.append(out[0]["instances"].track_ids.tolist())
    assert ids == [[1]] * 6


def test_track_and_detect_query_groups_give_the_same_outputs_as_one_concatenated_sequence():
    """frame_forward assembles [track queries] + [detect queries] with ``assemble_query_groups`` (the two
    groups see each other, as MOTR): bit-identical to the former plain concatenation fed to the decoder
    without a mask."""
    torch.manual_seed(0)
    model = build_model(_cfg())
    model.eval()
    T_ = 3
    C = model.hidden_dim
    tracks = (torch.randn(T_, C), torch.randn(T_, C), torch.rand(T_, 4) * 0.5 + 0.25)
    img = (torch.rand(3, 64, 96) * 255).to(torch.uint8)
    with torch.no_grad():
        images = model.preprocess_image([{"image": img}])
        out = model.frame_forward(images, tracks)
        # the former code path, written out
        srcs, masks, pos_embeds = model.prepare_features(images)
        enc = model.transformer.forward_encoder(srcs, masks, pos_embeds)
        tgt_d, ref_d, pos_d, _, _ = model.transformer.prepare_queries(enc, model.query_embed.weight)
        ref_d = torch.cat([ref_d, model.detect_ref_wh.sigmoid()[None]], -1)
        tgt = torch.cat([tracks[0][None], tgt_d], 1)
        pos = torch.cat([tracks[1][None], pos_d], 1)
        ref = torch.cat([tracks[2][None], ref_d], 1)
        hs, init_ref, inter_refs = model.transformer.forward_decoder(tgt, ref, pos, enc)
        logits, coords = model.predict_from_decoder(hs, init_ref, inter_refs)
    assert out["num_tracks"] == T_
    assert torch.equal(out["pred_logits"], logits[-1, 0]) and torch.equal(out["pred_boxes"], coords[-1, 0])
    assert torch.equal(out["hs"], hs[-1, 0]) and torch.equal(out["query_pos"], pos[0])
    for layer, (a, b) in zip(out["aux_outputs"], zip(logits[:-1], coords[:-1])):
        assert torch.equal(layer["pred_logits"], a[0]) and torch.equal(layer["pred_boxes"], b[0])


@pytest.mark.parametrize("rebind", [False, True])
def test_rebound_track_carries_the_detect_query(rebind):
    cfg = _cfg("MODEL.TRACKER.REBIND_MISSED_TRACKS", str(rebind), "MODEL.TRACKER.MAX_AGE", "5")
    model = build_model(cfg)
    model.eval()
    model.frame_forward = fake = FadingTrackStandIn(model, [0.5, 0.5, 0.2, 0.2])
    carried = []
    model.qim.register_forward_pre_hook(lambda module, args: carried.append(args[0]))
    img = torch.zeros(3, 64, 96, dtype=torch.uint8)
    ids = [
        model([{"image": img, "height": 64, "width": 96, "sequence": "a", "frame_idx": i}])[0]["instances"]
        for i in range(3)
    ]
    ids = [inst.track_ids.tolist() for inst in ids]
    # frame 1: born from detect query 0; frames 2, 3: its track query scores ~0 while detect query 0 sees
    # the object: re-bound (same id, the detect query carried) or suppressed as its duplicate (not shown)
    assert ids == ([[1], [1], [1]] if rebind else [[1], [], []])
    for frame in (1, 2):
        T_ = fake.outputs[frame]["num_tracks"]
        source = T_ if rebind else 0  # detect query 0 or the track's own query
        assert T_ == 1 and torch.equal(carried[frame], fake.outputs[frame]["hs"][[source]])
