"""
Deformable transformer (encoder + decoder, optional two-stage proposals), numerically following
the official Deformable DETR (fundamentalvision/Deformable-DETR). Module and parameter names are
the official ones so official checkpoints map by prefix.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import constant_, normal_, xavier_uniform_

from ddetr_d2.ops import MSDeformAttn

from .box_ops import inverse_sigmoid

__all__ = [
    "DeformableTransformer",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "DeformableTransformerDecoder",
    "DeformableTransformerDecoderLayer",
]


def _clones(module, n):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _with_pos(tensor, pos):
    return tensor if pos is None else tensor + pos


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention -> norm1 -> FFN -> norm2."""

    def __init__(
        self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, im2col_step=64
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, im2col_step)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        """src, pos: (N, S, C); reference_points: (N, S, L, 2); padding_mask: (N, S) bool."""
        src2 = self.self_attn(
            _with_pos(src, pos), reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios, device):
        """
        Pixel centres of every level, normalised by that level's valid extent, then scaled by the
        valid ratio of every level. Returns (N, S, L, 2) in (x, y) order.
        """
        refs = []
        for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, H - 0.5, H, dtype=torch.float32, device=device),
                torch.linspace(0.5, W - 0.5, W, dtype=torch.float32, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
            refs.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(refs, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos=None, padding_mask=None):
        output = src
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, device=src.device)
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm layer: self-attention -> norm2 -> deformable cross-attention -> norm1 -> FFN -> norm3."""

    def __init__(
        self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, im2col_step=64
    ):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, im2col_step)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        src,
        src_spatial_shapes,
        level_start_index,
        src_padding_mask=None,
        self_attn_mask=None,
    ):
        """
        tgt, query_pos: (N, Q, C); reference_points: (N, Q, L, 2 or 4); src: (N, S, C);
        self_attn_mask: None or (Q, Q) bool, True = query i may not attend to query j.
        """
        q = k = _with_pos(tgt, query_pos)
        if self_attn_mask is None:
            tgt2 = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1))[0]
        else:
            tgt2 = self.self_attn(
                q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1), attn_mask=self_attn_mask
            )[0]
        tgt2 = tgt2.transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(
            _with_pos(tgt, query_pos),
            reference_points,
            src,
            src_spatial_shapes,
            level_start_index,
            src_padding_mask,
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """
    Stack of decoder layers returning every layer's output. With iterative box refinement the
    meta-architecture sets ``bbox_embed`` (one head per layer, the official "hack"): after each layer the
    reference points are refined in logit space and detached. In two-stage, it also sets ``class_embed``.
    ``look_forward_twice`` (DINO): the returned references keep their gradient (only the ones fed to
    the next layer are detached), so layer l's box loss also trains layer l-1's box head; the values
    are the same either way.
    """

    def __init__(self, decoder_layer, num_layers, look_forward_twice=False):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice
        self.bbox_embed = None
        self.class_embed = None

    def forward(
        self,
        tgt,
        reference_points,
        src,
        src_spatial_shapes,
        src_level_start_index,
        src_valid_ratios,
        query_pos=None,
        src_padding_mask=None,
        self_attn_mask=None,
    ):
        """
        Args:
            tgt, query_pos: (N, Q, C); reference_points: (N, Q, 2 or 4) in [0, 1] relative to the
            valid (unpadded) image; src: (N, S, C); src_valid_ratios: (N, L, 2);
            self_attn_mask: None or (Q, Q) bool, True = may not attend (see ``query_groups.py``).
        Returns:
            hs (n_layers, N, Q, C) and the reference points after each layer (n_layers, N, Q, 2 or 4).
        """
        output = tgt
        intermediate, intermediate_refs = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = (
                    reference_points[:, :, None]
                    * torch.cat([src_valid_ratios, src_valid_ratios], -1)[:, None]
                )
            elif reference_points.shape[-1] == 2:
                ref_input = reference_points[:, :, None] * src_valid_ratios[:, None]
            else:
                raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
            output = layer(
                output,
                query_pos,
                ref_input,
                src,
                src_spatial_shapes,
                src_level_start_index,
                src_padding_mask,
                self_attn_mask,
            )

            if self.bbox_embed is not None:
                tmp = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_ref = (tmp + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_ref = torch.cat(
                        [tmp[..., :2] + inverse_sigmoid(reference_points), tmp[..., 2:]], -1
                    ).sigmoid()
                reference_points = new_ref.detach()
                intermediate_refs.append(new_ref if self.look_forward_twice else reference_points)
            else:
                intermediate_refs.append(reference_points)
            intermediate.append(output)
        return torch.stack(intermediate), torch.stack(intermediate_refs)


class DeformableTransformer(nn.Module):
    """
    Encoder + decoder. ``forward`` reproduces the official ``DeformableTransformer.forward``;
    ``forward_encoder`` / ``prepare_queries`` / ``forward_decoder`` are its three stages, usable on
    their own (e.g. by a tracker that runs the encoder once per frame and decodes its own queries).
    ``exclude_padding_proposals`` (two-stage): keep padded positions out of the proposal top-k
    (False: official behaviour).
    ``mixed_query_selection`` (two-stage, DINO): the queries' positions come from the top-k proposals,
    their content from a learned ``tgt_embed`` (Q, C) instead of the proposals' sine embedding.
    ``look_forward_twice`` (box refinement, DINO): see :class:`DeformableTransformerDecoder`.
    """

    def __init__(
        self,
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=1024,
        dropout=0.1,
        num_feature_levels=4,
        dec_n_points=4,
        enc_n_points=4,
        two_stage=False,
        two_stage_num_proposals=300,
        im2col_step=64,
        exclude_padding_proposals=True,
        mixed_query_selection=False,
        look_forward_twice=False,
    ):
        super().__init__()
        self.exclude_padding_proposals = exclude_padding_proposals
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        if mixed_query_selection and not two_stage:
            raise ValueError("mixed query selection needs two-stage (positions from the encoder's top-k)")
        self.mixed_query_selection = mixed_query_selection

        enc_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points, im2col_step
        )
        self.encoder = DeformableTransformerEncoder(enc_layer, num_encoder_layers)
        dec_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points, im2col_step
        )
        self.decoder = DeformableTransformerDecoder(dec_layer, num_decoder_layers, look_forward_twice)

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
            if mixed_query_selection:
                self.tgt_embed = nn.Embedding(two_stage_num_proposals, d_model)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        # order matters: blanket xavier first, then the deformable-attention init on top of it
        for p in self.parameters():
            if p.dim() > 1:
                xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            xavier_uniform_(self.reference_points.weight.data, gain=1.0)
            constant_(self.reference_points.bias.data, 0.0)
        normal_(self.level_embed)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def get_valid_ratio(mask):
        """(N, H, W) bool padding mask -> (N, 2) valid fraction (x = width, y = height)."""
        _, H, W = mask.shape
        valid_H = torch.sum(~mask[:, :, 0], 1)
        valid_W = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)

    @staticmethod
    def get_proposal_pos_embed(proposals, num_pos_feats=128, temperature=10000):
        """(N, K, 4) logit-space boxes -> (N, K, 4 * num_pos_feats) sine embedding of sigmoid(boxes) * 2pi."""
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid() * scale
        pos = pos[:, :, :, None] / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes):
        """
        One proposal per encoder position: centre at the pixel centre (relative to the valid
        extent), size 0.05 * 2**level. Proposals on padding or outside (0.01, 0.99) are +inf in logit
        space and their memory is zeroed.
        Returns (output_memory (N, S, C) after enc_output + enc_output_norm, proposals (N, S, 4) logits).
        """
        N, S, C = memory.shape
        proposals = []
        cur = 0
        for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
            mask_l = memory_padding_mask[:, cur : cur + H * W].view(N, H, W, 1)
            valid_H = torch.sum(~mask_l[:, :, 0, 0], 1)
            valid_W = torch.sum(~mask_l[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.linspace(0, H - 1, H, dtype=torch.float32, device=memory.device),
                torch.linspace(0, W - 1, W, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_W.unsqueeze(-1), valid_H.unsqueeze(-1)], 1).view(N, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(N, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((grid, wh), -1).view(N, -1, 4))
            cur += H * W
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~valid, float("inf"))

        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    # ------------------------------------------------------------------ stages
    def forward_encoder(self, srcs, masks, pos_embeds):
        """
        Args:
            srcs: list of L (N, C, H_l, W_l) projected features.
            masks: list of L (N, H_l, W_l) bool, True at padding.
            pos_embeds: list of L (N, C, H_l, W_l) position embeddings (level_embed is added here).
        Returns:
            dict with ``memory`` (N, S, C), ``spatial_shapes`` (L, 2) int64 (H, W),
            ``level_start_index`` (L,) int64, ``valid_ratios`` (N, L, 2) float (x, y),
            ``mask_flatten`` (N, S) bool; S = sum_l H_l * W_l.
        """
        if not (len(srcs) == len(masks) == len(pos_embeds) == self.num_feature_levels):
            raise ValueError(
                f"expected {self.num_feature_levels} levels, got srcs/masks/pos_embeds of lengths "
                f"{len(srcs)}/{len(masks)}/{len(pos_embeds)}"
            )
        src_flatten, mask_flatten, lvl_pos_flatten, spatial_shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_shapes.append(src.shape[-2:])
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_flatten = torch.cat(lvl_pos_flatten, 1)
        spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)
        memory = self.encoder(
            src_flatten, spatial_shapes, level_start_index, valid_ratios, lvl_pos_flatten, mask_flatten
        )
        return {
            "memory": memory,
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "valid_ratios": valid_ratios,
            "mask_flatten": mask_flatten,
        }

    def prepare_queries(self, enc, query_embed=None):
        """
        Decoder inputs from the encoder output.
        Single-stage: ``query_embed`` (Q, 2C) is split into query_pos (first C) and tgt (last C);
        reference points = sigmoid(reference_points(query_pos)) (N, Q, 2).
        Two-stage: top-``two_stage_num_proposals`` encoder proposals by class-0 score give detached
        (N, Q, 4) reference boxes, and query_pos / tgt from their sine embedding.
        Returns:
            tgt (N, Q, C), reference_points (N, Q, 2 or 4), query_pos (N, Q, C),
            enc_outputs_class (N, S, K) or None, enc_outputs_coord_unact (N, S, 4) or None.
        """
        memory = enc["memory"]
        bs, _, c = memory.shape
        if self.two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(
                memory, enc["mask_flatten"], enc["spatial_shapes"]
            )
            nl = self.decoder.num_layers
            enc_outputs_class = self.decoder.class_embed[nl](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[nl](output_memory) + output_proposals
            topk_coords_unact = self.select_proposals(
                enc, enc_outputs_class, enc_outputs_coord_unact, self.two_stage_num_proposals
            )
            topk = topk_coords_unact.shape[1]
            reference_points = topk_coords_unact.sigmoid()
            query_pos, tgt = self.embed_reference_boxes(topk_coords_unact)
            if self.mixed_query_selection:
                tgt = self.tgt_embed.weight[None, :topk].expand(bs, -1, -1)
            return tgt, reference_points, query_pos, enc_outputs_class, enc_outputs_coord_unact
        if query_embed is None:
            raise ValueError("query_embed (Q, 2*d_model) is required without two-stage")
        query_pos, tgt = torch.split(query_embed, c, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
        tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
        reference_points = self.reference_points(query_pos).sigmoid()
        return tgt, reference_points, query_pos, None, None

    def select_proposals(self, enc, enc_outputs_class, enc_outputs_coord_unact, k):
        """
        Two-stage: the top-``k`` encoder proposals by class-0 score (fewer if there are fewer tokens).
        Args:
            enc: ``forward_encoder``'s dict (its ``mask_flatten`` (N, S) marks padding);
            enc_outputs_class (N, S, K), enc_outputs_coord_unact (N, S, 4): ``prepare_queries``' outputs.
        Returns:
            (N, min(k, S), 4) detached boxes in logit space, best first.
        """
        topk = min(k, enc_outputs_class.shape[1])
        scores = enc_outputs_class[..., 0]
        if self.exclude_padding_proposals:
            # padded positions never become queries (so outputs do not depend on the other images
            # of the batch); the official code ranks them too (identical when there is no padding)
            scores = scores.masked_fill(enc["mask_flatten"], float("-inf"))
        topk_proposals = torch.topk(scores, topk, dim=1)[1]
        return torch.gather(enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4)).detach()

    def embed_reference_boxes(self, boxes_unact):
        """
        Two-stage query embedding of boxes: ``pos_trans_norm(pos_trans(sine(boxes)))`` split in two.
        Args:
            boxes_unact: (N, Q, 4) boxes in logit space (inverse sigmoid of cxcywh in [0, 1]).
        Returns:
            query_pos (N, Q, C), tgt (N, Q, C).
        """
        if not self.two_stage:
            raise ValueError("embed_reference_boxes needs the two-stage transformer (pos_trans)")
        c = self.d_model
        pos_trans_out = self.pos_trans_norm(
            self.pos_trans(self.get_proposal_pos_embed(boxes_unact, num_pos_feats=c // 2))
        )
        query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
        return query_pos, tgt

    def forward_decoder(self, tgt, reference_points, query_pos, enc, self_attn_mask=None):
        """
        Args:
            tgt, query_pos: (N, Q, C); reference_points: (N, Q, 2) points or (N, Q, 4) boxes
                (cx, cy, w, h) in [0, 1] (sigmoid space) relative to the valid image;
            enc: dict returned by :meth:`forward_encoder`;
            self_attn_mask: None or (Q, Q) bool, True = may not attend (e.g.
                ``assemble_query_groups(...).attn_mask``).
        Returns:
            hs (n_dec_layers, N, Q, C), init_reference (N, Q, 2 or 4) (= the input reference points),
            inter_references (n_dec_layers, N, Q, 2 or 4): references after each layer (refined
            and detached with box refinement, otherwise the input repeated).
        """
        hs, inter_references = self.decoder(
            tgt,
            reference_points,
            enc["memory"],
            enc["spatial_shapes"],
            enc["level_start_index"],
            enc["valid_ratios"],
            query_pos,
            enc["mask_flatten"],
            self_attn_mask,
        )
        return hs, reference_points, inter_references

    def forward(self, srcs, masks, pos_embeds, query_embed=None):
        """
        Returns (as the official module): hs (n_dec, N, Q, C), init_reference (N, Q, 2|4),
        inter_references (n_dec, N, Q, 2|4), enc_outputs_class (N, S, K) | None,
        enc_outputs_coord_unact (N, S, 4) | None.
        """
        enc = self.forward_encoder(srcs, masks, pos_embeds)
        tgt, reference_points, query_pos, enc_cls, enc_coord = self.prepare_queries(enc, query_embed)
        hs, init_reference, inter_references = self.forward_decoder(tgt, reference_points, query_pos, enc)
        return hs, init_reference, inter_references, enc_cls, enc_coord
