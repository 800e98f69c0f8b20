"""Sampling-point visualisation: coordinate mapping, recording hooks on MSDeformAttn, drawing (no model)."""

import numpy as np
import pytest
import torch
from torch import nn

from ddetr_d2.demo.sampling import (
    LEVEL_COLORS_BGR,
    DetectionSampling,
    SamplingRecorder,
    draw_sampling_points,
    make_panel_grid,
    normalized_to_image_coords,
    points_inside,
)
from ddetr_d2.ops.ms_deform_attn import MSDeformAttn


def test_known_location_maps_to_expected_pixel():
    # padded 160x224, resized (unpadded) 150x200, original 300x400: x = 0.5 * 224 * 2, y = 0.25 * 160 * 2
    xy = normalized_to_image_coords(np.array([0.5, 0.25]), (160, 224), (150, 200), (300, 400))
    np.testing.assert_allclose(xy, [224.0, 80.0])
    corner = normalized_to_image_coords(
        torch.tensor([[200 / 224, 150 / 160]]), (160, 224), (150, 200), (300, 400)
    )
    np.testing.assert_allclose(corner, [[400.0, 300.0]])  # the unpadded corner is the image corner


def test_blob_through_real_resize_and_padding_maps_back():
    """A blob resized and padded like the predictor does, found in the padded input, maps back onto itself."""
    from detectron2.data import transforms as T

    rng = np.random.default_rng()
    h, w = int(rng.integers(150, 400)), int(rng.integers(150, 400))
    y0, x0 = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
    image = np.zeros((h, w, 3), np.uint8)
    image[y0 : y0 + 16, x0 : x0 + 16] = 255
    resized = T.ResizeShortestEdge([128, 128], 192).get_transform(image).apply_image(image)
    h_in, w_in = resized.shape[:2]
    h_pad, w_pad = -(-h_in // 32) * 32, -(-w_in // 32) * 32
    padded = np.zeros((h_pad, w_pad), np.float64)
    padded[:h_in, :w_in] = resized[..., 0]
    ys, xs = np.mgrid[0:h_pad, 0:w_pad]
    centroid = np.array([((xs + 0.5) * padded).sum(), ((ys + 0.5) * padded).sum()]) / padded.sum()
    loc = centroid / np.array([w_pad, h_pad])
    xy = normalized_to_image_coords(loc, (h_pad, w_pad), (h_in, w_in), (h, w))
    expected = np.array([x0 + 8.0, y0 + 8.0])  # continuous centre of the 16x16 blob
    assert np.abs(xy - expected).max() < 0.5 * max(h / h_in, w / w_in) + 0.5, (xy, expected)


def test_in_range_locations_fall_inside_and_padding_outside():
    rng = np.random.default_rng()
    padded, inp, img = (192, 256), (171, 230), (513, 690)
    loc = rng.uniform(0, 1, size=(1000, 2)) * np.array([inp[1] / padded[1], inp[0] / padded[0]]) * (1 - 1e-9)
    xy = normalized_to_image_coords(loc, padded, inp, img)
    assert points_inside(xy, img).all()
    assert xy[:, 0].max() < img[1] and xy[:, 1].max() < img[0] and xy.min() >= 0
    in_pad = np.stack([rng.uniform(inp[1] / padded[1] + 1e-3, 1, 100), rng.uniform(0, 1, 100)], -1)
    assert not points_inside(normalized_to_image_coords(in_pad, padded, inp, img), img).any()
    with pytest.raises(ValueError, match="larger than the padded"):
        normalized_to_image_coords(loc, (100, 100), inp, img)


class _Layer(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.cross_attn = attn


class _Decoder(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(attn)])


class _Transformer(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.decoder = _Decoder(attn)


class _ToyDETR(nn.Module):
    """What the recorder relies on: backbone(padded tensor), transformer.decoder.layers[-1].cross_attn."""

    def __init__(self, d=16, levels=2, heads=2, points=3, queries=5, ref_dim=2):
        super().__init__()
        self.ref_dim = ref_dim  # 2: reference points (x, y); 4: boxes (cx, cy, w, h), as with box refinement
        self.backbone = nn.Conv2d(3, d, 8, stride=8)
        self.transformer = _Transformer(MSDeformAttn(d, levels, heads, points))
        self.query = nn.Parameter(torch.randn(queries, d))
        self.levels = levels
        self.seen = {}

    def forward(self, batched_inputs):
        hs = [x["image"].shape[-2:] for x in batched_inputs]
        h_pad, w_pad = (-(-max(s[i] for s in hs) // 32) * 32 for i in range(2))
        x = torch.zeros(len(hs), 3, h_pad, w_pad)
        for i, inp in enumerate(batched_inputs):
            x[i, :, : hs[i][0], : hs[i][1]] = inp["image"]
        feats = [self.backbone(x)]
        for _ in range(1, self.levels):
            feats.append(nn.functional.avg_pool2d(feats[-1], 2, ceil_mode=True))
        shapes = torch.tensor([f.shape[-2:] for f in feats], dtype=torch.long)
        start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
        flat = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        query = self.query[None].expand(len(hs), -1, -1)
        ref = torch.rand(len(hs), query.shape[1], self.levels, self.ref_dim)
        self.seen = dict(query=query, ref=ref, shapes=shapes, padded=(h_pad, w_pad))
        return self.transformer.decoder.layers[-1].cross_attn(query, ref, flat, shapes, start)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_recorder_captures_the_call_of_the_last_cross_attention(ref_dim):
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    model = _ToyDETR(ref_dim=ref_dim).eval()
    nn.init.normal_(model.transformer.decoder.layers[-1].cross_attn.sampling_offsets.weight, std=0.5)
    attn = model.transformer.decoder.layers[-1].cross_attn
    assert not hasattr(attn, "record_sampling")  # the shipped op keeps no recording state
    images = [torch.rand(3, 70, 101), torch.rand(3, 90, 64)]
    with SamplingRecorder(model) as rec, torch.no_grad():
        model([{"image": im} for im in images])
        records = [rec.latest(i) for i in range(2)]
    hooked = [model, model.backbone, attn, attn.sampling_offsets, attn.attention_weights]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in hooked)  # detach() removed them all
    seen = model.seen
    wh = seen["shapes"].flip(-1).double()  # (L, 2) as (W, H)
    with torch.no_grad():
        offsets = attn.sampling_offsets(seen["query"]).double().view(2, 5, 2, 2, 3, 2)
    for i, r in enumerate(records):
        assert r.input_hw == tuple(images[i].shape[-2:])
        assert r.padded_hw == seen["padded"] == (96, 128)
        np.testing.assert_allclose(r.reference, seen["ref"][i].numpy())
        # independent float64 recomputation: points: loc = ref + offset / (W_l, H_l);
        # boxes: loc = centre + offset / P * (w, h) / 2
        ref = seen["ref"][i].double()[:, None, :, None, :]
        if ref_dim == 2:
            expected = ref + offsets[i] / wh[None, None, :, None, :]
        else:
            expected = ref[..., :2] + offsets[i] / 3 * ref[..., 2:] / 2
        np.testing.assert_allclose(r.locations, expected.numpy(), atol=1e-5)
        assert r.weights.shape == (5, 2, 2, 3)
        np.testing.assert_allclose(r.weights.sum(axis=(-1, -2)), 1.0, atol=1e-5)
    det = records[1].select([4, 0], (180, 128))
    assert det.points.shape == (2, 2, 2, 3, 2) and det.reference_xy.shape == (2, 2)
    np.testing.assert_allclose(
        det.reference_xy[0],
        seen["ref"][1, 4, 0, :2].numpy() * np.array([128 * 128 / 64, 96 * 180 / 90]),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="out of range"):
        records[0].select([5], (70, 101))


def test_recorder_rejects_a_model_without_deformable_decoder():
    with pytest.raises(ValueError, match="cross_attn"):
        SamplingRecorder(nn.Linear(2, 2))


def _sampling(points, weights, ref, hw):
    return DetectionSampling(
        points=np.asarray(points, np.float64),
        weights=np.asarray(weights, np.float64),
        reference_xy=np.asarray(ref, np.float64),
        image_hw=hw,
    )


def test_draw_colours_by_level_sizes_by_weight_and_skips_outside_points():
    hw = (120, 160)
    # one detection, one head, two levels, two points; (300, 10) is outside the image
    points = [[[[[20.2, 30.7], [140.0, 100.0]], [[60.0, 60.0], [300.0, 10.0]]]]]
    sampling = _sampling(points, [[[[0.25, 0.25], [0.25, 0.25]]]], [[100.0, 20.0]], hw)
    image = np.zeros(hw + (3,), np.uint8)
    out, drawn = draw_sampling_points(image, sampling, alpha=1.0)
    assert image.max() == 0  # the input is not modified
    np.testing.assert_allclose(drawn, [[20.2, 30.7], [140.0, 100.0], [60.0, 60.0]])
    assert tuple(out[30, 20]) == LEVEL_COLORS_BGR[0] and tuple(out[100, 140]) == LEVEL_COLORS_BGR[0]
    assert tuple(out[60, 60]) == LEVEL_COLORS_BGR[1]
    assert tuple(out[20, 100]) == (255, 255, 255)  # reference cross
    only_level1, drawn1 = draw_sampling_points(image, sampling, levels=[1], draw_reference=False, alpha=1.0)
    assert len(drawn1) == 1 and only_level1[30, 20].max() == 0

    big = np.zeros((600, 800, 3), np.uint8)

    def painted(weight):
        s = _sampling([[[[[380.0, 260.0]]]]], [[[[weight]]]], [[-5.0, -5.0]], (600, 800))
        return int((draw_sampling_points(big, s, alpha=1.0)[0].max(-1) > 0).sum())

    assert painted(1.0) > painted(0.3) > painted(0.01) > 0
    with pytest.raises(ValueError, match="mapped to size"):
        draw_sampling_points(np.zeros((10, 10, 3), np.uint8), sampling)


def test_panel_grid_layout():
    panels = [np.full((30, 40, 3), i * 50, np.uint8) for i in range(3)]
    grid = make_panel_grid(panels, ["a", "b", "c"], pad=4)
    title_h = (grid.shape[0] - 4) // 2 - 30 - 4
    assert grid.shape[1] == 2 * (40 + 4) + 4 and grid.shape[0] == 2 * (30 + title_h + 4) + 4
    # the second panel (value 50) sits right of the first, under its title strip
    assert (grid[4 + title_h : 4 + title_h + 30, 4 + 44 : 4 + 44 + 40] == 50).all()
