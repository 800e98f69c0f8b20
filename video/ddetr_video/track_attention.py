"""MOTR's extra self-attention among track queries in every decoder layer (``--extra_track_attn``).

Before a decoder layer's own self-attention (over all ``[T track] + [Q detect]`` queries), the track queries
attend only among themselves (MOTR's ``_forward_track_attn`` in ``deformable_transformer_plus.py``)::

    q = k = tgt[:, :T] + query_pos[:, :T]
    tgt[:, :T] = norm(tgt[:, :T] + dropout(attn(q, k, tgt[:, :T])))      # detect queries unchanged

It is attached without changing the detector's decoder layer: each :class:`TrackSelfAttention` block lives
in the tracker (state-dict prefix ``track_attn.<layer>.``) and is registered as a forward *pre-hook* of its
decoder layer, rewriting the layer's ``tgt`` argument. The tracker sets ``num_tracks`` (the length of the
track group at the front of the query sequence) around its decoder call; with ``num_tracks == 0`` (no
tracks, the detector's own forward, ``detect``) the hook passes the inputs through untouched.
"""

import torch
from torch import nn

__all__ = ["TrackSelfAttention", "attach_track_attention"]


class TrackSelfAttention(nn.Module):
    """
    One extra attention block over the first ``num_tracks`` queries.

    Args:
        d_model: C; nheads: attention heads; dropout: as the decoder's.
    """

    def __init__(self, d_model, nheads, dropout=0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.num_tracks = 0
        # MOTR's block sits in the transformer, whose _reset_parameters applies xavier to every matrix
        for p in self.attn.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt, query_pos, num_tracks):
        """tgt, query_pos: (N, Q, C), the first ``num_tracks`` queries are tracks -> updated tgt (N, Q, C)."""
        if num_tracks <= 0:
            return tgt
        t = tgt[:, :num_tracks]
        q = (t + query_pos[:, :num_tracks]).transpose(0, 1)
        t2 = self.attn(q, q, t.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
        return torch.cat([self.norm(t + self.dropout(t2)), tgt[:, num_tracks:]], 1)

    def pre_hook(self, layer, args, kwargs):
        """Forward pre-hook of a decoder layer called as ``layer(tgt, query_pos, ...)``."""
        if self.num_tracks <= 0:
            return None
        args = list(args)
        if args:
            tgt = args[0]
        else:
            tgt = kwargs["tgt"]
        pos = args[1] if len(args) > 1 else kwargs["query_pos"]
        new = self.forward(tgt, pos, self.num_tracks)
        if args:
            args[0] = new
        else:
            kwargs["tgt"] = new
        return tuple(args), kwargs


def attach_track_attention(decoder_layers, blocks):
    """Register ``blocks[i].pre_hook`` on ``decoder_layers[i]``; returns the hook handles."""
    if len(decoder_layers) != len(blocks):
        raise ValueError(f"{len(blocks)} track-attention blocks for {len(decoder_layers)} decoder layers")
    return [
        layer.register_forward_pre_hook(block.pre_hook, with_kwargs=True)
        for layer, block in zip(decoder_layers, blocks)
    ]
