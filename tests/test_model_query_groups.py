"""The query-group seam: one group computes exactly what the decoder computed before the seam; blocked
groups compute what they compute alone; the mask is built from (viewer, seen) pairs."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from model_testing import VARIANTS, tiny_cfg

from ddetr_d2.modeling.box_ops import inverse_sigmoid
from ddetr_d2.modeling.query_groups import QueryGroup, assemble_query_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _old_layer(layer, tgt, query_pos, ref_input, src, shapes, start, padding):
    """Frozen copy of the decoder layer's forward before the seam (no self-attention mask)."""
    q = k = tgt + query_pos
    tgt2 = layer.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1))[0].transpose(0, 1)
    tgt = layer.norm2(tgt + layer.dropout2(tgt2))
    tgt2 = layer.cross_attn(tgt + query_pos, ref_input, src, shapes, start, padding)
    tgt = layer.norm1(tgt + layer.dropout1(tgt2))
    tgt2 = layer.linear2(layer.dropout3(F.relu(layer.linear1(tgt))))
    return layer.norm3(tgt + layer.dropout4(tgt2))


def _old_decoder(decoder, tgt, ref, query_pos, enc):
    """Frozen copy of the decoder loop before the seam."""
    vr = enc["valid_ratios"]
    output, hs, refs = tgt, [], []
    for lid, layer in enumerate(decoder.layers):
        ref_input = ref[:, :, None] * (torch.cat([vr, vr], -1) if ref.shape[-1] == 4 else vr)[:, None]
        output = _old_layer(
            layer,
            output,
            query_pos,
            ref_input,
            enc["memory"],
            enc["spatial_shapes"],
            enc["level_start_index"],
            enc["mask_flatten"],
        )
        if decoder.bbox_embed is not None:
            tmp = decoder.bbox_embed[lid](output)
            if ref.shape[-1] == 4:
                new_ref = (tmp + inverse_sigmoid(ref)).sigmoid()
            else:
                new_ref = torch.cat([tmp[..., :2] + inverse_sigmoid(ref), tmp[..., 2:]], -1).sigmoid()
            ref = new_ref.detach()
        hs.append(output)
        refs.append(ref)
    return torch.stack(hs), torch.stack(refs)


def _model_and_enc(variant, seed=0, dec_layers=2):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(DEC_LAYERS=dec_layers, DROPOUT=0.0, **VARIANTS[variant]))
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    images = [
        torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in [(64, 96), (80, 64)]
    ]
    with torch.no_grad():
        imgs = model.preprocess_image([{"image": x} for x in images])
        srcs, masks, pos = model.prepare_features(imgs)
        enc = model.transformer.forward_encoder(srcs, masks, pos)
    return model, imgs, enc


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_group_is_bit_identical_to_the_old_decoder(variant):
    model, images, enc = _model_and_enc(variant)
    query = None if model.two_stage else model.query_embed.weight
    with torch.no_grad():
        tgt, ref, pos, _, _ = model.transformer.prepare_queries(enc, query)
        old_hs, old_refs = _old_decoder(model.transformer.decoder, tgt, ref, pos, enc)
        old_cls, old_box = model.predict_from_decoder(old_hs, ref, old_refs)

        q = assemble_query_groups([QueryGroup("detect", tgt, pos, ref)])
        assert q.attn_mask is None and q.slices == {"detect": slice(0, tgt.shape[1])}
        hs, init_ref, refs = model.transformer.forward_decoder(
            q.content, q.reference_points, q.position, enc, q.attn_mask
        )
        out = model.forward_outputs(images)
    assert torch.equal(hs, old_hs) and torch.equal(refs, old_refs) and torch.equal(init_ref, ref)
    assert torch.equal(out["pred_logits"], old_cls[-1]) and torch.equal(out["pred_boxes"], old_box[-1])
    for a, c, b in zip(out["aux_outputs"], old_cls[:-1], old_box[:-1]):
        assert torch.equal(a["pred_logits"], c) and torch.equal(a["pred_boxes"], b)
    assert "query_groups" not in out


def _random_group(name, n, q, c, ref_dim, gen):
    return QueryGroup(
        name,
        torch.randn(n, q, c, generator=gen),
        torch.randn(n, q, c, generator=gen),
        torch.rand(n, q, ref_dim, generator=gen) * 0.6 + 0.2,
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_blocked_groups_equal_their_runs_alone(variant):
    """
    Blocked both ways, each group's outputs equal those of a run with that group alone. Not bitwise:
    the masked softmax runs over Q_a + Q_b keys with exp(-inf) = 0 for the blocked ones, the matmuls
    have other sizes, so sums are ordered differently (differences ~1e-6).
    """
    model, _, enc = _model_and_enc(variant, seed=3, dec_layers=3)
    gen = torch.Generator().manual_seed(7)
    ref_dim = 4 if model.two_stage else 2
    a = _random_group("a", 2, 7, 64, ref_dim, gen)
    b = _random_group("b", 2, 5, 64, ref_dim, gen)
    dec = model.transformer.forward_decoder
    with torch.no_grad():
        both = assemble_query_groups([a, b], blocked=[("a", "b"), ("b", "a")])
        assert both.attn_mask.shape == (12, 12)
        hs, _, refs = dec(both.content, both.reference_points, both.position, enc, both.attn_mask)
        alone = {g.name: dec(g.content, g.reference_points, g.position, enc) for g in (a, b)}
        # one way only: a does not see b, b sees a -> a unchanged, b changed
        one_way = assemble_query_groups([a, b], blocked=[("a", "b")])
        hs1, _, _ = dec(one_way.content, one_way.reference_points, one_way.position, enc, one_way.attn_mask)
    for name, part in both.split(hs, 2).items():
        torch.testing.assert_close(part, alone[name][0], rtol=1e-5, atol=1e-5)
    for name, part in both.split(refs, 2).items():
        torch.testing.assert_close(part, alone[name][2], rtol=1e-5, atol=1e-5)
    split1 = one_way.split(hs1, 2)
    torch.testing.assert_close(split1["a"], alone["a"][0], rtol=1e-5, atol=1e-5)
    assert (split1["b"] - alone["b"][0]).abs().max() > 1e-3


def test_mask_from_pairs_and_errors():
    gen = torch.Generator().manual_seed(0)
    g = [_random_group(n, 1, q, 8, 4, gen) for n, q in [("x", 2), ("y", 3), ("z", 1)]]
    q = assemble_query_groups(g, blocked=[("x", "y"), ("z", "x"), ("z", "y")])
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:2, 2:5] = True
    expected[5, 0:5] = True
    assert torch.equal(q.attn_mask, expected)
    assert q.slices == {"x": slice(0, 2), "y": slice(2, 5), "z": slice(5, 6)}
    assert torch.equal(q.content, torch.cat([x.content for x in g], 1))
    parts = q.split(torch.arange(6)[None], 1)
    assert [p.tolist() for p in parts.values()] == [[[0, 1]], [[2, 3, 4]], [[5]]]
    # nothing blocked -> no mask
    assert assemble_query_groups(g).attn_mask is None

    with pytest.raises(ValueError, match="no group 'w'"):
        assemble_query_groups(g, blocked=[("x", "w")])
    with pytest.raises(ValueError, match="unique"):
        assemble_query_groups([g[0], g[0]])
    with pytest.raises(ValueError, match="mix 2-d"):
        assemble_query_groups([g[0], _random_group("p", 1, 2, 8, 2, gen)])
    with pytest.raises(ValueError, match="blocked from every group"):
        assemble_query_groups(g, blocked=[("z", "x"), ("z", "y"), ("z", "z")])
    with pytest.raises(ValueError, match="batch size"):
        assemble_query_groups([g[0], _random_group("p", 2, 2, 8, 4, gen)])
