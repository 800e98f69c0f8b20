"""Query interaction module: this frame's decoder outputs of live tracks -> next frame's track queries.

Follows the idea of MOTR's QIM (self-attention among the tracks, then residual FFN updates of the content
part and, optionally, of the positional part of each query), written for our decoder API where a query is a
``(tgt, query_pos)`` pair of ``hidden_dim`` vectors plus a reference box in sigmoid space.
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["QueryInteractionModule"]


class QueryInteractionModule(nn.Module):
    """
    Args:
        hidden_dim: C.
        nheads: heads of the self-attention among tracks.
        dim_feedforward: hidden size of the FFNs.
        dropout: dropout in attention / FFNs.
        update_query_pos: also update the positional half of the query.
    """

    def __init__(self, hidden_dim=256, nheads=8, dim_feedforward=1024, dropout=0.0, update_query_pos=True):
        super().__init__()
        self.update_query_pos = update_query_pos
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

    def forward(self, hs, query_pos, boxes):
        """
        Args:
            hs: (T, C) last decoder layer output embeddings of the live tracks.
            query_pos: (T, C) their query positional embeddings used this frame.
            boxes: (T, 4) their predicted boxes (cx, cy, w, h) in [0, 1].
        Returns:
            (tgt (T, C), query_pos (T, C), ref_boxes (T, 4) detached, in [0, 1]) for the next frame.
        """
        if hs.dim() != 2 or query_pos.shape != hs.shape or boxes.shape != (hs.shape[0], 4):
            raise ValueError(
                f"QIM expects hs (T, C), query_pos (T, C), boxes (T, 4); got {tuple(hs.shape)}, "
                f"{tuple(query_pos.shape)}, {tuple(boxes.shape)}"
            )
        ref = boxes.detach().clamp(1e-4, 1 - 1e-4)
        if hs.shape[0] == 0:
            return hs, query_pos, ref
        q = (hs + query_pos)[None]
        attn = self.self_attn(q, q, hs[None], need_weights=False)[0][0]
        x = self.norm1(hs + self.dropout(attn))
        x = self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        tgt = self.norm_feat(hs + self.dropout(self.linear_feat2(self.dropout(F.relu(self.linear_feat1(x))))))
        if self.update_query_pos:
            upd = self.linear_pos2(self.dropout(F.relu(self.linear_pos1(x))))
            query_pos = self.norm_pos(query_pos + self.dropout(upd))
        return tgt, query_pos, ref


def empty_like_queries(hidden_dim, device):
    """(tgt, query_pos, ref_boxes) with zero tracks."""
    z = torch.zeros(0, hidden_dim, device=device)
    return z, z.clone(), torch.zeros(0, 4, device=device)
