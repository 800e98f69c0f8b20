"""``MODEL.TRACKER.DETECT_SEES_TRACKS``: which track queries the detect queries attend to ("all": MOTR;
"shown": not those of tracks missed in the previous frame; "none": no track, the per-frame detector's
outputs)."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from tracking_testing import FadingTrackStandIn

from ddetr_d2.errors import ConfigError
from ddetr_video.config import get_tracker_cfg
from ddetr_video.runtime_tracker import RuntimeTracker

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_tiny.yaml")


# a small test input and few detect queries keep the model cheap
SMALL = {"INPUT.MIN_SIZE_TEST": "64", "INPUT.MAX_SIZE_TEST": "96", "MODEL.DEFORMABLE_DETR.NUM_QUERIES": "8"}


def _model(*opts):
    cfg = get_tracker_cfg(CONFIG, [x for kv in SMALL.items() for x in kv] + list(opts))
    torch.manual_seed(int(torch.randint(0, 10**6, (1,))))
    return build_model(cfg).eval()


def _frame(model, T_):
    C = model.hidden_dim
    tracks = (torch.randn(T_, C), torch.randn(T_, C), torch.rand(T_, 4) * 0.5 + 0.25)
    img = (torch.rand(3, 64, 96) * 255).to(torch.uint8)
    return model.preprocess_image([{"image": img}]), tracks


@pytest.mark.parametrize("extra_track_attn", [False, True])
def test_detect_queries_with_every_track_hidden_are_the_detectors(extra_track_attn):
    """Every track hidden: the detect queries' outputs equal those of a frame without tracks (the tracks are
    still decoded); hiding nothing is the unmasked forward, bit for bit."""
    model = _model("MODEL.TRACKER.EXTRA_TRACK_ATTN", str(extra_track_attn))
    images, tracks = _frame(model, 3)
    with torch.no_grad():
        masked = model.frame_forward(images, tracks, hidden=torch.ones(3, dtype=torch.bool))
        alone = model.frame_forward(images, model._empty_tracks())
        plain = model.frame_forward(images, tracks)
        none_hidden = model.frame_forward(images, tracks, hidden=torch.zeros(3, dtype=torch.bool))
    for key in ("pred_logits", "pred_boxes", "hs"):
        torch.testing.assert_close(masked[key][3:], alone[key], rtol=1e-5, atol=1e-5)
        assert torch.equal(none_hidden[key], plain[key])
        assert torch.isfinite(masked[key]).all()
    assert (plain["pred_logits"][3:] - alone["pred_logits"]).abs().max() > 1e-3  # tracks matter when seen
    assert masked["pred_logits"].shape[0] == 3 + model.num_detect_queries


def test_the_decoder_mask_blocks_only_detect_to_hidden_track():
    model = _model()
    images, tracks = _frame(model, 4)
    hidden = torch.tensor([False, True, False, True])
    masks = []
    decoder = model.transformer.forward_decoder

    def spy(tgt, ref, pos, enc, self_attn_mask=None):
        masks.append(self_attn_mask)
        return decoder(tgt, ref, pos, enc, self_attn_mask)

    model.transformer.forward_decoder = spy
    with torch.no_grad():
        model.frame_forward(images, tracks, hidden=hidden)
        model.frame_forward(images, tracks)
    n = 4 + model.num_detect_queries
    expected = torch.zeros(n, n, dtype=torch.bool)
    expected[4:, 1] = expected[4:, 3] = True
    assert torch.equal(masks[0], expected)
    assert masks[1] is None


def test_hidden_must_have_one_flag_per_track():
    model = _model()
    images, tracks = _frame(model, 3)
    with pytest.raises(ValueError, match=r"hidden must be \(3,\)"):
        model.frame_forward(images, tracks, hidden=torch.tensor([True, False]))


def test_runtime_tracker_hides_the_tracks_its_setting_names():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    for sees in ("all", "shown", "none"):
        tr = RuntimeTracker(birth_threshold=0.5, keep_threshold=0.4, max_age=3, detect_sees=sees)
        assert tr.hidden_from_detect() is None  # no tracks
        tr.update(torch.zeros(0), torch.zeros(0, 4), torch.tensor([0.9, 0.8]), box)
        expected = {"all": None, "shown": None, "none": [True, True]}[sees]  # nobody missed yet
        got = tr.hidden_from_detect()
        assert (got.tolist() if got is not None else None) == expected
        tr.update(torch.tensor([0.9, 0.1]), box, torch.zeros(0), torch.zeros(0, 4))  # track 2 missed
        expected = {"all": None, "shown": [False, True], "none": [True, True]}[sees]
        got = tr.hidden_from_detect()
        assert (got.tolist() if got is not None else None) == expected
        tr.update(torch.tensor([0.9, 0.9]), box, torch.zeros(0), torch.zeros(0, 4))  # track 2 is back
        assert (tr.hidden_from_detect() is None) == (sees != "none")
        tr.reset()
        assert tr.hidden_from_detect() is None


def test_a_bad_setting_is_a_config_error():
    with pytest.raises(ValueError, match="detect_sees"):
        RuntimeTracker(detect_sees="missed")
    with pytest.raises(ConfigError, match="MODEL.TRACKER.DETECT_SEES_TRACKS"):
        _model("MODEL.TRACKER.DETECT_SEES_TRACKS", "some")


@pytest.mark.parametrize("sees", ["all", "shown", "none"])
def test_track_passes_the_hidden_tracks_to_the_decoder(sees):
    """Through ``QueryTracker.track``: a track born at frame 0 whose query fades (score ~0) is missed from
    frame 1 on (re-binding off, so the detection stays suppressed as a duplicate); ``frame_forward`` gets the
    tracks to hide from the detect queries as the setting says."""
    model = _model("MODEL.TRACKER.DETECT_SEES_TRACKS", sees, "MODEL.TRACKER.REBIND_MISSED_TRACKS", "False")
    stand_in = FadingTrackStandIn(model, [0.5, 0.5, 0.2, 0.2])
    seen = []

    def recording(images, tracks, hidden=None):
        seen.append(None if hidden is None else hidden.tolist())
        return stand_in(images, tracks)

    model.frame_forward = recording
    img = torch.zeros(3, 64, 96, dtype=torch.uint8)
    ids = [
        model([{"image": img, "height": 64, "width": 96, "sequence": "a", "frame_idx": i}])[0][
            "instances"
        ].track_ids
        for i in range(4)
    ]
    assert [i.tolist() for i in ids] == [[1], [], [], []]
    expected = {
        "all": [None] * 4,
        "shown": [None, None, [True], [True]],
        "none": [None, [True], [True], [True]],
    }
    assert seen == expected[sees]
