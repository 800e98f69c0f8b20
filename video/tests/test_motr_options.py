"""The MOTR options of issue 13 (items 3-5): the QIM residual and init, the extra track self-attention, the
IoU gate on carried tracks, the growing clip length (worker-safe) and the per-clip interval."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model

from ddetr_d2.errors import ConfigError
from ddetr_video.clip_mapper import sample_clip_indices
from ddetr_video.clip_schedule import ClipLengthSchedule, IterationTaggedSampler, ScheduledClipDataset
from ddetr_video.config import get_tracker_cfg
from ddetr_video.qim import QueryInteractionModule
from ddetr_video.track_attention import TrackSelfAttention

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_tiny.yaml")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(*opts):
    cfg = get_tracker_cfg(
        CONFIG,
        [
            "MODEL.DEFORMABLE_DETR.NUM_QUERIES",
            "6",
            "INPUT.MIN_SIZE_TEST",
            "64",
            "INPUT.MAX_SIZE_TEST",
            "96",
            *opts,
        ],
    )
    return build_model(cfg)


# ------------------------------------------------------------------------------------------ item 3: QIM
@pytest.mark.parametrize("residual", ["previous_query", "decoder_output"])
def test_qim_content_update_is_residual_on_the_chosen_base(residual):
    torch.manual_seed(0)
    C, T_ = 16, 5
    qim = QueryInteractionModule(C, 4, 32, residual=residual).double()
    hs, pos, prev = (torch.randn(T_, C, dtype=torch.float64) for _ in range(3))
    boxes = torch.rand(T_, 4, dtype=torch.float64)
    # the content FFN's output is a constant b: tgt = LayerNorm(base + b) with the chosen base
    with torch.no_grad():
        qim.linear_feat2.weight.zero_()
    b = qim.linear_feat2.bias.detach()
    tgt, new_pos, ref = qim(hs, pos, boxes, prev)
    base = prev if residual == "previous_query" else hs
    mu = (base + b).mean(-1, keepdim=True)
    var = (base + b).var(-1, unbiased=False, keepdim=True)
    expected = (base + b - mu) / torch.sqrt(var + 1e-5) * qim.norm_feat.weight + qim.norm_feat.bias
    torch.testing.assert_close(tgt, expected, rtol=1e-10, atol=1e-10)
    assert not ref.requires_grad and torch.equal(ref, boxes.clamp(1e-4, 1 - 1e-4))


@pytest.mark.parametrize("T_", [1, 7])
def test_qim_track_self_attention_equals_multihead_attention_and_float64_reference(T_):
    """The written-out self-attention among tracks against ``nn.MultiheadAttention`` with the same weights
    and against softmax(QK^T / sqrt(d)) V by hand, in float64; gradients reach the same parameters."""
    torch.manual_seed(T_)
    C, H = 16, 4
    qim = QueryInteractionModule(C, H, 32).double()
    hs, pos = torch.randn(T_, C, dtype=torch.float64), torch.randn(T_, C, dtype=torch.float64)
    out = qim.track_self_attention(hs, pos)
    q = (hs + pos)[None]
    ref_mha = qim.self_attn(q, q, hs[None], need_weights=False)[0][0]
    torch.testing.assert_close(out, ref_mha, rtol=1e-12, atol=1e-12)
    w, b = qim.self_attn.in_proj_weight, qim.self_attn.in_proj_bias
    d = C // H
    qs, ks, vs = (
        (x @ w[i * C : (i + 1) * C].T + b[i * C : (i + 1) * C])
        for i, x in enumerate((hs + pos, hs + pos, hs))
    )
    heads = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        a = torch.softmax(qs[:, sl] @ ks[:, sl].T / math.sqrt(d), dim=-1)
        heads.append(a @ vs[:, sl])
    ref = qim.self_attn.out_proj(torch.cat(heads, -1))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert qim.self_attn.in_proj_weight.grad is not None and qim.self_attn.out_proj.weight.grad is not None


def test_qim_track_self_attention_dropout_only_in_training():
    torch.manual_seed(0)
    qim = QueryInteractionModule(16, 4, 32, dropout=0.5)
    hs, pos = torch.randn(6, 16), torch.randn(6, 16)
    qim.eval()
    assert torch.equal(qim.track_self_attention(hs, pos), qim.track_self_attention(hs, pos))
    qim.train()
    assert not torch.equal(qim.track_self_attention(hs, pos), qim.track_self_attention(hs, pos))


def test_qim_previous_query_needs_the_previous_content():
    qim = QueryInteractionModule(8, 2, 16)
    with pytest.raises(ValueError, match="prev_tgt"):
        qim(torch.randn(3, 8), torch.randn(3, 8), torch.rand(3, 4))


def test_qim_xavier_init_bounds_every_matrix():
    torch.manual_seed(1)
    qim = QueryInteractionModule(64, 4, 128, init="xavier")
    default = QueryInteractionModule(64, 4, 128, init="default")
    for name, p in qim.named_parameters():
        if p.dim() > 1:
            fan_out, fan_in = p.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert p.abs().max() <= bound, name
            # a xavier-uniform matrix spreads over its bound (its std is bound / sqrt(3))
            assert abs(float(p.std()) - bound / math.sqrt(3)) < 0.1 * bound, name
    # PyTorch's default Linear init (kaiming_uniform, a=sqrt(5)) is bounded by 1/sqrt(fan_in) instead
    w = default.linear1.weight
    assert w.abs().max() <= 1 / math.sqrt(w.shape[1])


# ------------------------------------------------------------------------------- item 4: track attention
def _mha_reference(attn, x, pos, T_):
    """float64 multi-head self-attention among x[:, :T] (seq-first MultiheadAttention semantics)."""
    C = x.shape[-1]
    h = attn.num_heads
    W, b = attn.in_proj_weight.double(), attn.in_proj_bias.double()
    t = x[:, :T_].double()
    q_in = t + pos[:, :T_].double()
    q = q_in @ W[:C].T + b[:C]
    k = q_in @ W[C : 2 * C].T + b[C : 2 * C]
    v = t @ W[2 * C :].T + b[2 * C :]
    N, L = t.shape[:2]
    split = lambda z: z.view(N, L, h, C // h).transpose(1, 2)  # noqa: E731
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(C // h), -1) @ split(v)
    o = a.transpose(1, 2).reshape(N, L, C) @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()
    return o


def test_track_self_attention_block_against_float64_reference_and_detect_queries_untouched():
    torch.manual_seed(2)
    C, T_, Q = 16, 3, 5
    block = TrackSelfAttention(C, 4).eval()
    x, pos = torch.randn(1, T_ + Q, C), torch.randn(1, T_ + Q, C)
    out = block(x, pos, T_)
    ref = F.layer_norm(
        x[:, :T_].double() + _mha_reference(block.attn, x, pos, T_),
        (C,),
        block.norm.weight.double(),
        block.norm.bias.double(),
    )
    torch.testing.assert_close(out[:, :T_].double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, T_:], x[:, T_:])
    # a detect query changed: the tracks' outputs of the block are bit-identical
    x2 = x.clone()
    x2[:, T_ + 1] += 5.0
    pos2 = pos.clone()
    pos2[:, T_ + 2] -= 3.0
    assert torch.equal(block(x2, pos2, T_)[:, :T_], out[:, :T_])
    # a track query changed: the other tracks' outputs move
    x3 = x.clone()
    x3[:, 0] += 5.0
    assert not torch.allclose(block(x3, pos, T_)[:, 1:T_], out[:, 1:T_])
    assert torch.equal(block(x, pos, 0), x)


def _frame_inputs(model, T_=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = model.hidden_dim
    tracks = (
        torch.randn(T_, C, generator=g),
        torch.randn(T_, C, generator=g),
        torch.rand(T_, 4, generator=g),
    )
    tracks = (tracks[0], tracks[1], tracks[2] * 0.5 + 0.25)
    img = (torch.rand(3, 64, 96, generator=g) * 255).to(torch.uint8)
    return model.preprocess_image([{"image": img}]), tracks


def test_extra_track_attention_off_adds_nothing_and_on_is_identical_without_tracks():
    torch.manual_seed(0)
    off = _model().eval()
    assert off.track_attn is None
    assert all(len(layer._forward_pre_hooks) == 0 for layer in off.transformer.decoder.layers)
    on = _model("MODEL.TRACKER.EXTRA_TRACK_ATTN", "True").eval()
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("track_attn.") for k in missing)
    assert len(on.track_attn) == len(on.transformer.decoder.layers)
    with torch.no_grad():
        images, tracks = _frame_inputs(off)
        empty = off._empty_tracks()
        a, b = off.frame_forward(images, empty), on.frame_forward(images, empty)
        assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(
            a["pred_boxes"], b["pred_boxes"]
        )
        # with tracks the extra block acts
        a, b = off.frame_forward(images, tracks), on.frame_forward(images, tracks)
        assert not torch.equal(a["hs"][:3], b["hs"][:3])
        # the plain detector forward (no tracks) is unchanged too
        assert all(block.num_tracks == 0 for block in on.track_attn)


def test_extra_track_attention_in_the_decoder_sees_only_tracks():
    """The first decoder layer's input after the extra block: tracks = block(tracks), detect queries as
    assembled; perturbing a detect query leaves the tracks' part bit-identical."""
    torch.manual_seed(3)
    model = _model("MODEL.TRACKER.EXTRA_TRACK_ATTN", "True").eval()
    layer0 = model.transformer.decoder.layers[0]
    seen = []
    layer0.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))  # runs after the block
    images, tracks = _frame_inputs(model)
    T_ = tracks[0].shape[0]
    with torch.no_grad():
        out = model.frame_forward(images, tracks)
        x0 = seen[-1]
        expected_tracks = model.track_attn[0](tracks[0][None], tracks[1][None], T_)[:, :T_]
        assert torch.equal(x0[:, :T_], expected_tracks)
        assert torch.equal(x0[0, T_:], out["tgt"][T_:])  # detect queries enter as assembled
        with torch.no_grad():
            model.query_embed.weight[2] += 1.0  # one detect query's (query_pos, tgt) changes
        model.frame_forward(images, tracks)
    x1 = seen[-1]
    assert torch.equal(x1[:, :T_], x0[:, :T_])
    assert not torch.equal(x1[:, T_:], x0[:, T_:])


# -------------------------------------------------------------------------------------- item 5: IoU gate
def _iou_xyxy(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _xyxy(c):
    return [c[0] - c[2] / 2, c[1] - c[3] / 2, c[0] + c[2] / 2, c[1] + c[3] / 2]


@pytest.mark.parametrize("gate", [0.0, 0.5, 0.7])
def test_train_track_iou_gate_on_old_and_new_tracks(gate):
    """Slots 0-1: old tracks of objects 5 and 6; slot 2: track of object 8, absent this frame; detect
    queries 3, 4 matched to the new objects 7 and 9. Random boxes around the targets; a matched query is
    carried iff its IoU (brute force) > gate; the absent track is kept (it passed the gate when matched)."""
    rng = np.random.default_rng(int(gate * 10))
    model = _model(
        "MODEL.TRACKER.TRAIN_TRACK_IOU",
        str(gate),
        "MODEL.TRACKER.RANDOM_DROP",
        "0.0",
        "MODEL.TRACKER.FP_RATIO",
        "0.0",
    )
    for _ in range(20):
        gt = [
            [rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.3)]
            for _ in range(4)
        ]
        pred = [[g[0] + rng.normal(0, 0.04), g[1] + rng.normal(0, 0.04), g[2], g[3]] for g in gt]
        boxes = [pred[0], pred[1], [0.5, 0.5, 0.1, 0.1], pred[2], pred[3]] + [[0.9, 0.9, 0.05, 0.05]] * 6
        n = len(boxes)
        out = {"pred_logits": torch.zeros(n, 3), "pred_boxes": torch.tensor(boxes), "num_tracks": 3}
        target = {"track_ids": torch.tensor([5, 6, 7, 9]), "boxes": torch.tensor(gt, dtype=torch.float32)}
        match = (torch.tensor([0, 1, 3, 4]), torch.tensor([0, 1, 2, 3]))
        q, ids, ages = model._select_training_tracks(
            out, target, match, torch.tensor([5, 6, 8]), torch.tensor([0, 0, 0])
        )
        expected = {
            slot: oid
            for slot, oid, k in ((0, 5, 0), (1, 6, 1), (3, 7, 2), (4, 9, 3))
            if gate <= 0 or _iou_xyxy(_xyxy(boxes[slot]), _xyxy(gt[k])) > gate
        }
        expected[2] = 8  # the absent track, kept with one miss
        assert dict(zip(q.tolist(), ids.tolist())) == expected
        assert ages[q.tolist().index(2)] == 1


def test_min_track_iou_key_is_gone_and_the_default_gate_is_motr():
    cfg = get_tracker_cfg(CONFIG)
    assert cfg.MODEL.TRACKER.TRAIN_TRACK_IOU == 0.5
    assert "MIN_TRACK_IOU" not in cfg.MODEL.TRACKER


# -------------------------------------------------------------------------- item 5: clip-length schedule
def test_clip_length_schedule_against_reference():
    sched = ClipLengthSchedule((2, 3, 4, 5), (100, 250, 400))
    for it in [0, 1, 99, 100, 101, 249, 250, 399, 400, 10**6] + list(
        np.random.default_rng(0).integers(0, 600, 50)
    ):
        expected = 2 + sum(int(it) >= s for s in (100, 250, 400))
        assert sched(it) == expected, it
    assert sched(None) == 2
    assert ClipLengthSchedule((4,))(123) == 4
    for lengths, steps in [((2, 3), ()), ((2, 3), (5, 6)), ((2, 3, 4), (5, 5)), ((0,), ()), ((2, 3), (0,))]:
        with pytest.raises(ConfigError, match="CLIP_LENGTH"):
            ClipLengthSchedule(lengths, steps)


def test_sampler_tags_each_sample_with_its_iteration_and_resumes():
    sampler = IterationTaggedSampler(7, batch_per_process=3, seed=0)
    first = [x for _, x in zip(range(30), sampler)]
    assert [it for _, it in first] == [p // 3 for p in range(30)]
    sampler.start_index = 12  # resumed at iteration 4
    resumed = [x for _, x in zip(range(18), sampler)]
    assert resumed == first[12:]


class _LengthMapper:
    """Stand-in for ClipDatasetMapper: records the schedule's length for the sample's iteration."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, d, iteration=None):
        return {
            "index": d["i"],
            "iteration": iteration,
            "length": self.schedule(iteration),
            "pid": os.getpid(),
        }


@pytest.mark.parametrize("workers", [0, 2])
def test_growing_clips_follow_the_iteration_in_loader_workers(workers):
    """Batches come from worker processes: each clip's length is the schedule's at its batch's iteration."""
    sched = ClipLengthSchedule((2, 3, 4, 5), (3, 5, 8))
    dataset = ScheduledClipDataset([{"i": i} for i in range(5)], _LengthMapper(sched))
    sampler = IterationTaggedSampler(len(dataset), batch_per_process=2, seed=1)
    loader = build_detection_train_loader(
        dataset=dataset,
        mapper=None,
        sampler=sampler,
        total_batch_size=2,
        aspect_ratio_grouping=False,
        num_workers=workers,
    )
    pids = set()
    for it, batch in zip(range(10), loader):
        assert [b["iteration"] for b in batch] == [it, it]
        assert [b["length"] for b in batch] == [sched(it)] * 2
        pids |= {b["pid"] for b in batch}
    assert (os.getpid() in pids) == (workers == 0)


def test_per_clip_interval_is_one_gap_per_clip():
    rng = np.random.RandomState(0)
    seen = set()
    for _ in range(300):
        seq_len = int(rng.randint(1, 40))
        length, gap = int(rng.randint(1, 6)), int(rng.randint(1, 5))
        anchor = int(rng.randint(0, seq_len))
        pos = sample_clip_indices(anchor, seq_len, length, gap, rng, mode="per_clip")
        assert len(pos) == min(length, seq_len)
        assert all(0 <= p < seq_len for p in pos) and pos[0] <= anchor
        d = np.diff(pos)
        assert (d >= 1).all() and (d <= gap).all()
        assert len(set(d.tolist())) <= 1, pos  # one interval for the whole clip
        if len(d) and (gap - 1) * (length - 1) < seq_len:
            seen.add((gap, int(d[0])))
    # every interval in [1, gap] occurs when the clip fits
    assert {(4, g) for g in range(1, 5)} <= seen
    with pytest.raises(ValueError, match="interval mode"):
        sample_clip_indices(0, 10, 3, 2, rng, mode="sometimes")


def test_clip_mapper_length_follows_the_iteration(tmp_path):
    from detectron2.data import DatasetCatalog

    from ddetr_video.clip_mapper import ClipDatasetMapper
    from ddetr_video.datasets import register_synthetic_mot
    from ddetr_video.synthetic_video import SyntheticVideoConfig

    small = SyntheticVideoConfig(num_frames=12, width=96, height=64, min_size=10, max_size=20, num_objects=4)
    names = register_synthetic_mot(str(tmp_path / "d"), small, {"train": 1}, seed=5, prefix="test_sched")
    try:
        cfg = get_tracker_cfg(
            CONFIG,
            [
                "DATASETS.TRAIN",
                f"('{names[0]}',)",
                "INPUT.CLIP_LENGTHS",
                "(2, 3, 5)",
                "INPUT.CLIP_LENGTH_STEPS",
                "(10, 20)",
                "INPUT.CLIP_MAX_INTERVAL",
                "2",
            ],
        )
        mapper = ClipDatasetMapper(cfg, is_train=True, augmentations=[])
        d = DatasetCatalog.get(names[0])[0]
        for it, n in [(0, 2), (9, 2), (10, 3), (19, 3), (20, 5), (500, 5)]:
            clip = mapper(d, iteration=it)["clip"]
            assert len(clip) == n
            assert len(set(np.diff([f["frame_idx"] for f in clip]).tolist())) == 1
    finally:
        for n in names:
            DatasetCatalog.remove(n)


# ------------------------------------------------------------------ other MOTR options (video/README.md)
def test_point_reference_feeds_track_centres_and_detect_points_to_the_decoder():
    torch.manual_seed(4)
    model = _model("MODEL.TRACKER.REFERENCE", "point").eval()
    assert not hasattr(model, "detect_ref_wh")
    images, tracks = _frame_inputs(model)
    with torch.no_grad():
        out = model.frame_forward(images, tracks)
        srcs, masks, pos_embeds = model.prepare_features(images)
        enc = model.transformer.forward_encoder(srcs, masks, pos_embeds)
        tgt_d, ref_d, pos_d, _, _ = model.transformer.prepare_queries(enc, model.query_embed.weight)
        assert ref_d.shape[-1] == 2
        tgt = torch.cat([tracks[0][None], tgt_d], 1)
        pos = torch.cat([tracks[1][None], pos_d], 1)
        ref = torch.cat([tracks[2][None, :, :2], ref_d], 1)
        hs, init_ref, inter_refs = model.transformer.forward_decoder(tgt, ref, pos, enc)
        logits, coords = model.predict_from_decoder(hs, init_ref, inter_refs)
    assert torch.equal(out["pred_logits"], logits[-1, 0]) and torch.equal(out["pred_boxes"], coords[-1, 0])
    with pytest.raises(ConfigError, match="REFERENCE"):
        _model("MODEL.TRACKER.REFERENCE", "corner")


def test_report_threshold_leaves_out_low_scores():
    from detectron2.structures import Boxes, Instances

    model = _model("MODEL.TRACKER.REPORT_THRESHOLD", "0.7")
    inst = Instances((10, 10))
    inst.pred_boxes = Boxes(torch.tensor([[0.0, 0, 5, 5]] * 4))
    inst.scores = torch.tensor([0.9, 0.7, 0.69, 0.71])
    assert model._drop_small(inst).scores.tolist() == pytest.approx([0.9, 0.71])


def test_loss_normaliser_counts_absent_tracks_when_asked():
    """MOTR's num_samples: objects + track slots whose object is absent; losses scale by the ratio."""
    torch.manual_seed(5)
    model = _model("MODEL.TRACKER.MIN_BIRTH_VISIBILITY", "0.0")
    images, tracks = _frame_inputs(model)
    with torch.no_grad():
        out = model.frame_forward(images, tracks)  # 3 track slots
    target = {
        "labels": torch.tensor([0, 2]),
        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.1, 0.3]]),
        "track_ids": torch.tensor([5, 7]),
    }
    track_ids = torch.tensor([5, 9, -1])  # slot 1 follows object 9, absent; slot 2 follows nothing
    crit = model.criterion
    record = {
        "outputs": out,
        "target": target,
        "indices": crit.match_frame(out, target, track_ids),
        "track_obj_ids": track_ids,
    }
    assert crit._num_absent(record) == 1
    plain = crit([record])
    crit.count_absent_tracks = True
    motr = crit([record])
    assert set(plain) == set(motr)
    for k in plain:
        torch.testing.assert_close(motr[k] * 3, plain[k] * 2)
