"""Query interaction module: this frame's decoder outputs of live tracks -> next frame's track queries.

Follows MOTR's QIM (``models/qim.py``: self-attention among the tracks, then residual FFN updates of the
content part and, optionally, of the positional part of each query), written for our decoder API where a
query is a ``(tgt, query_pos)`` pair of ``hidden_dim`` vectors plus a reference box in sigmoid space.

``residual`` (``MODEL.TRACKER.QIM_RESIDUAL``) is the base of the content update:

* ``"previous_query"`` (MOTR): the content query the track had as decoder *input* this frame,
  ``tgt_next = norm(tgt_prev + FFN(x))``;
* ``"decoder_output"``: this frame's decoder output, ``tgt_next = norm(hs + FFN(x))``.

``x`` is ``hs`` after the self-attention among tracks and an FFN, in both forms; the positional update is
always on the previous ``query_pos``. ``init`` ``"xavier"`` (MOTR's ``_reset_parameters``) re-initialises
every weight matrix with ``xavier_uniform_``; ``"default"`` keeps PyTorch's initialisation.
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["QueryInteractionModule", "QIM_RESIDUALS", "QIM_INITS"]

QIM_RESIDUALS = ("previous_query", "decoder_output")
QIM_INITS = ("xavier", "default")


class QueryInteractionModule(nn.Module):
    """
    Args:
        hidden_dim: C.
        nheads: heads of the self-attention among tracks.
        dim_feedforward: hidden size of the FFNs.
        dropout: dropout in attention / FFNs.
        update_query_pos: also update the positional half of the query.
        residual: ``"previous_query"`` (MOTR) or ``"decoder_output"``, the base of the content update.
        init: ``"xavier"`` (MOTR) or ``"default"``.
    """

    def __init__(
        self,
        hidden_dim=256,
        nheads=8,
        dim_feedforward=1024,
        dropout=0.0,
        update_query_pos=True,
        residual="previous_query",
        init="xavier",
    ):
        super().__init__()
        if residual not in QIM_RESIDUALS:
            raise ValueError(f"QIM residual must be one of {QIM_RESIDUALS}, got {residual!r}")
        if init not in QIM_INITS:
            raise ValueError(f"QIM init must be one of {QIM_INITS}, got {init!r}")
        self.update_query_pos = update_query_pos
        self.residual = residual
        self.self_attn = nn.MultiheadAttention(hidden_dim, nheads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        # content update
        self.linear_feat1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear_feat2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm_feat = nn.LayerNorm(hidden_dim)
        if update_query_pos:
            self.linear_pos1 = nn.Linear(hidden_dim, dim_feedforward)
            self.linear_pos2 = nn.Linear(dim_feedforward, hidden_dim)
            self.norm_pos = nn.LayerNorm(hidden_dim)
        if init == "xavier":
            for p in self.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, hs, query_pos, boxes, prev_tgt=None):
        """
        Args:
            hs: (T, C) last decoder layer output embeddings of the live tracks.
            query_pos: (T, C) their query positional embeddings used this frame.
            boxes: (T, 4) their predicted boxes (cx, cy, w, h) in [0, 1].
            prev_tgt: (T, C) their content queries fed to the decoder this frame (needed by
                ``residual="previous_query"``).
        Returns:
            (tgt (T, C), query_pos (T, C), ref_boxes (T, 4) detached, in [0, 1]) for the next frame.
        """
        if hs.dim() != 2 or query_pos.shape != hs.shape or boxes.shape != (hs.shape[0], 4):
            raise ValueError(
                f"QIM expects hs (T, C), query_pos (T, C), boxes (T, 4); got {tuple(hs.shape)}, "
                f"{tuple(query_pos.shape)}, {tuple(boxes.shape)}"
            )
        if self.residual == "previous_query":
            if prev_tgt is None or prev_tgt.shape != hs.shape:
                got = None if prev_tgt is None else tuple(prev_tgt.shape)
                raise ValueError(f"QIM residual 'previous_query' needs prev_tgt {tuple(hs.shape)}, got {got}")
            base = prev_tgt
        else:
            base = hs
        ref = boxes.detach().clamp(1e-4, 1 - 1e-4)
        if hs.shape[0] == 0:
            return hs, query_pos, ref
        drop = self.dropout if self.training else _identity  # nn.Dropout's call costs more than tracks do
        x = self.norm1(hs + drop(self.track_self_attention(hs, query_pos)))
        x = self.norm2(x + drop(self.linear2(drop(F.relu(self.linear1(x))))))
        tgt = self.norm_feat(base + drop(self.linear_feat2(drop(F.relu(self.linear_feat1(x))))))
        if self.update_query_pos:
            upd = self.linear_pos2(drop(F.relu(self.linear_pos1(x))))
            query_pos = self.norm_pos(query_pos + drop(upd))
        return tgt, query_pos, ref

    def track_self_attention(self, hs, query_pos):
        """Multi-head self-attention among the tracks with ``self.self_attn``'s weights (queries and keys
        ``hs + query_pos``, values ``hs``): (T, C), (T, C) -> (T, C).

        The same arithmetic as calling ``self.self_attn`` (video/tests/test_motr_options.py checks it in
        float64), written out because ``nn.MultiheadAttention``'s argument handling costs more than its
        arithmetic on tens of tracks (it ran once per frame of tracking).
        """
        mha = self.self_attn
        T, C = hs.shape
        h = mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        qk = F.linear(hs + query_pos, w[: 2 * C], b[: 2 * C]).view(T, 2, h, C // h).permute(1, 2, 0, 3)
        v = F.linear(hs, w[2 * C :], b[2 * C :]).view(T, h, C // h).transpose(0, 1)
        out = F.scaled_dot_product_attention(qk[0], qk[1], v, dropout_p=mha.dropout if self.training else 0.0)
        return mha.out_proj(out.transpose(0, 1).reshape(T, C))


def _identity(x):
    return x


def empty_like_queries(hidden_dim, device):
    """(tgt, query_pos, ref_boxes) with zero tracks."""
    z = torch.zeros(0, hidden_dim, device=device)
    return z, z.clone(), torch.zeros(0, 4, device=device)
