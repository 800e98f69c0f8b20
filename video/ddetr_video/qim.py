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
        q = (hs + query_pos)[None]
        attn = self.self_attn(q, q, hs[None], need_weights=False)[0][0]
        x = self.norm1(hs + self.dropout(attn))
        x = self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        tgt = self.norm_feat(
            base + self.dropout(self.linear_feat2(self.dropout(F.relu(self.linear_feat1(x)))))
        )
        if self.update_query_pos:
            upd = self.linear_pos2(self.dropout(F.relu(self.linear_pos1(x))))
            query_pos = self.norm_pos(query_pos + self.dropout(upd))
        return tgt, query_pos, ref


def empty_like_queries(hidden_dim, device):
    """(tgt, query_pos, ref_boxes) with zero tracks."""
    z = torch.zeros(0, hidden_dim, device=device)
    return z, z.clone(), torch.zeros(0, 4, device=device)
