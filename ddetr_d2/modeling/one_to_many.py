"""
One-to-many query group: the hybrid matching branch of H-DETR (Jia et al., CVPR 2023); training only.

Deformable DETR trains each object through one query (one-to-one matching), so few queries get a
positive signal early in training. H-DETR adds a second set of queries that runs through the same
decoder (same layers, same heads) and is matched to every ground-truth box repeated ``k`` times
(one Hungarian matching on the repeated targets), so up to ``k`` queries learn each object. The two
sets cannot attend to each other (nor to any other training-only group), and at inference the extra
set does not exist: the detector's outputs are those of a model trained without it.

Queries of the group (``one_to_many``), ``num_queries`` of them:

- two-stage: reference boxes = the encoder proposals ranked just after the detector's (ranks
  ``Q .. Q + num_queries - 1`` of the same top-k); position = their box embedding; content = the
  box embedding as well, or, with mixed query selection, a learned ``content`` (num_queries, C);
- single-stage: a learned ``query_embed`` (num_queries, 2C), split and used as the detector's own.

Losses: the detector's (focal + L1 + GIoU of the last layer and of every auxiliary layer, suffix
``_o2m`` / ``_o2m_{i}``, the base keys' weights) against the repeated targets, times ``loss_weight``.
Stored as ``training_groups.one_to_many.*``: unused at inference, dropped when a plain model loads
the weights (``ddetr_d2.checkpoint.TRAINING_ONLY_PREFIXES``).
"""

import torch
from torch import nn

from ..errors import ConfigError
from .query_groups import TRAINING_QUERY_GROUPS_REGISTRY, QueryGroup

__all__ = ["OneToManyGroup", "repeat_targets", "one_to_many"]

GROUP_NAME = "o2m"


def repeat_targets(targets, k):
    """Every target box and label repeated ``k`` times (``[b0..bT, b0..bT, ...]``), other keys dropped."""
    return [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]


class OneToManyGroup(nn.Module):
    """
    Args:
        hidden_dim: C of the detector.
        num_queries: size of the group.
        k: how often every target is repeated for its matching.
        loss_weight: factor on all of the group's losses (H-DETR's lambda).
        two_stage, mixed_query_selection: the detector's variant (which query parameters exist).
    """

    def __init__(
        self, hidden_dim, num_queries, k=6, loss_weight=1.0, two_stage=True, mixed_query_selection=False
    ):
        super().__init__()
        self.num_queries = num_queries
        self.k = k
        self.loss_weight = loss_weight
        self.two_stage = two_stage
        self.mixed_query_selection = mixed_query_selection
        # drawn from a forked RNG: the rest of the model initialises as it does without the group
        with torch.random.fork_rng(devices=[]):
            if not two_stage:
                self.query_embed = nn.Embedding(num_queries, 2 * hidden_dim)
            elif mixed_query_selection:
                self.content = nn.Embedding(num_queries, hidden_dim)

    def make_groups(self, targets, groups, transformer, context):
        """The ``o2m`` ``QueryGroup``, blocked from and to every group assembled so far."""
        detect = groups[0]
        n, q_detect, c = detect.content.shape
        if self.two_stage:
            if context is None or context.get("enc_outputs_class") is None:
                raise ValueError(
                    "the one-to-many group of a two-stage model needs the encoder outputs (context)"
                )
            boxes_unact = transformer.select_proposals(
                context["enc"],
                context["enc_outputs_class"],
                context["enc_outputs_coord_unact"],
                q_detect + self.num_queries,
            )[:, q_detect:]
            if boxes_unact.shape[1] == 0:
                return [], [], None
            reference_points = boxes_unact.sigmoid()
            position, content = transformer.embed_reference_boxes(boxes_unact)
            if self.mixed_query_selection:
                content = self.content.weight[None, : boxes_unact.shape[1]].expand(n, -1, -1)
        else:
            position, content = torch.split(self.query_embed.weight, c, dim=1)
            position = position.unsqueeze(0).expand(n, -1, -1)
            content = content.unsqueeze(0).expand(n, -1, -1)
            reference_points = transformer.reference_points(position).sigmoid()
        group = QueryGroup(GROUP_NAME, content, position, reference_points)
        blocked = [(GROUP_NAME, g.name) for g in groups] + [(g.name, GROUP_NAME) for g in groups]
        return [group], blocked, {"name": GROUP_NAME}

    def losses(self, group_outputs, targets, meta, criterion):
        """
        Weighted ``loss_{ce,bbox,giou}_o2m`` (+ ``_o2m_{i}`` for the auxiliary layers): the group's outputs
        Hungarian-matched to :func:`repeat_targets` (num_boxes = k x the targets, all-reduced).
        """
        repeated = repeat_targets(targets, self.k)
        device = targets[0]["boxes"].device if targets else torch.device("cpu")
        num_boxes = criterion.get_num_boxes(repeated, device)  # every worker calls it: a collective
        if meta is None:  # no proposal left for the group (fewer encoder tokens than queries)
            zero = sum((p.sum() for p in self.parameters()), torch.zeros((), device=device)) * 0.0
            return {"loss_ce_o2m": zero, "loss_bbox_o2m": zero, "loss_giou_o2m": zero}
        out = group_outputs[meta["name"]]
        losses = criterion._layer_losses(out, repeated, num_boxes, "_o2m")
        for i, aux in enumerate(out.get("aux_outputs", [])):
            losses.update(criterion._layer_losses(aux, repeated, num_boxes, f"_o2m_{i}"))
        return {key: value * self.loss_weight for key, value in criterion.apply_weights(losses).items()}


@TRAINING_QUERY_GROUPS_REGISTRY.register()
def one_to_many(cfg, num_classes, hidden_dim):
    """``OneToManyGroup`` from ``MODEL.DEFORMABLE_DETR.ONE_TO_MANY`` (None unless ``ENABLED``)."""
    c = cfg.MODEL.DEFORMABLE_DETR
    o = c.ONE_TO_MANY
    if not o.ENABLED:
        return None
    if o.NUM_QUERIES < 1 or o.K < 1 or o.LOSS_WEIGHT < 0:
        raise ConfigError(
            "MODEL.DEFORMABLE_DETR.ONE_TO_MANY: NUM_QUERIES and K must be >= 1 and LOSS_WEIGHT >= 0, got "
            f"{o.NUM_QUERIES} / {o.K} / {o.LOSS_WEIGHT}"
        )
    return OneToManyGroup(
        hidden_dim,
        o.NUM_QUERIES,
        k=o.K,
        loss_weight=o.LOSS_WEIGHT,
        two_stage=c.TWO_STAGE,
        mixed_query_selection=c.MIXED_QUERY_SELECTION,
    )
