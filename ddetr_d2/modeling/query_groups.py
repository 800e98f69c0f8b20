"""
Query groups: the one place where the decoder's queries are put together.

The decoder runs on one query tensor. A *group* is a named block of it (the detector's learned
queries, a tracker's track queries, denoising queries, ...). :func:`assemble_query_groups`
concatenates the groups and builds the decoder's self-attention mask from a list of blocked
(viewer, seen) pairs; :meth:`AssembledQueries.split` cuts any per-query output back into groups.

API::

    QueryGroup(name, content, position, reference_points)
        content (tgt), position (query_pos): (N, Q, C); reference_points: (N, Q, 2) points or
        (N, Q, 4) boxes (cx, cy, w, h) in [0, 1] (sigmoid space, relative to the valid image).
    assemble_query_groups(groups, blocked=()) -> AssembledQueries
        blocked: iterable of (viewer, seen) group names: the queries of ``viewer`` may not attend to
        those of ``seen`` (visibility is per ordered pair; unlisted pairs see each other).
    AssembledQueries: .content, .position (N, Q_total, C), .reference_points (N, Q_total, 2|4),
        .attn_mask: (Q_total, Q_total) bool, True = may not attend (``nn.MultiheadAttention``'s
        ``attn_mask``), or None when nothing is blocked; .slices {name: slice along the query axis};
        .split(tensor, dim) -> {name: tensor}.
    transformer.forward_decoder(q.content, q.reference_points, q.position, enc,
                                self_attn_mask=q.attn_mask)

With a single group (or nothing blocked) the tensors are passed through unchanged and the mask is
None, so the decoder computes exactly what it computes without groups.

Training-only groups (e.g. denoising, ``denoising.py``) are ``nn.Module`` s built by the functions of
:data:`TRAINING_QUERY_GROUPS_REGISTRY` (``fn(cfg, num_classes, hidden_dim) -> module or None``); the
detector keeps them in ``training_groups`` (state-dict prefix ``training_groups.``) and calls, in
training only:

- ``make_groups(targets, groups, transformer, context) -> (list[QueryGroup], blocked pairs, meta)``
  (``groups``: the groups assembled so far, the detector's ``"detect"`` first; ``context``: the
  encoder's outputs, ``{"enc": forward_encoder's dict, "enc_outputs_class": (N, S, K) or None,
  "enc_outputs_coord_unact": (N, S, 4) or None}`` (None without two-stage)); modules run in the
  order of their names
- ``losses(group_outputs, targets, meta, criterion) -> dict`` of weighted losses, where
  ``group_outputs[name]`` = ``{"pred_logits" (N, Q_g, K), "pred_boxes" (N, Q_g, 4),
  "aux_outputs": [...]}`` (earlier decoder layers, when ``AUX_LOSS``).

A new group type plugs in through this file and its own module; the decoder layer, the decoder, the
transformer and the meta-architecture stay as they are.
"""

from dataclasses import dataclass
from typing import Dict

import torch
from detectron2.utils.registry import Registry

__all__ = [
    "QueryGroup",
    "AssembledQueries",
    "assemble_query_groups",
    "TRAINING_QUERY_GROUPS_REGISTRY",
    "build_training_query_groups",
]

TRAINING_QUERY_GROUPS_REGISTRY = Registry("TRAINING_QUERY_GROUPS")
TRAINING_QUERY_GROUPS_REGISTRY.__doc__ = """
Builders of training-only query groups: ``fn(cfg, num_classes, hidden_dim) -> nn.Module or None``
(None when disabled by the config). The function's name is the module's key in the detector's
``training_groups`` (e.g. ``denoising`` -> ``training_groups.denoising.*``).
"""


@dataclass
class QueryGroup:
    """One named block of decoder queries (see the module docstring for shapes)."""

    name: str
    content: torch.Tensor
    position: torch.Tensor
    reference_points: torch.Tensor

    def __len__(self):
        return self.content.shape[1]


@dataclass
class AssembledQueries:
    content: torch.Tensor
    position: torch.Tensor
    reference_points: torch.Tensor
    attn_mask: torch.Tensor | None
    slices: Dict[str, slice]

    def split(self, tensor, dim=1):
        """Cut ``tensor`` along its query axis ``dim`` into ``{group name: tensor}``."""
        if tensor.shape[dim] != self.content.shape[1]:
            raise ValueError(
                f"tensor has {tensor.shape[dim]} queries along dim {dim}, the groups have "
                f"{self.content.shape[1]}"
            )
        return {name: tensor.narrow(dim, s.start, s.stop - s.start) for name, s in self.slices.items()}


def _check(groups):
    if not groups:
        raise ValueError("assemble_query_groups needs at least one group")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"query group names must be unique, got {names}")
    first = groups[0]
    for g in groups:
        n, q, c = g.content.shape
        if g.position.shape != g.content.shape:
            raise ValueError(
                f"group {g.name!r}: position {tuple(g.position.shape)} != content {tuple(g.content.shape)}"
            )
        if g.reference_points.shape[:2] != (n, q) or g.reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"group {g.name!r}: reference_points must be ({n}, {q}, 2|4), "
                f"got {tuple(g.reference_points.shape)}"
            )
        if (n, c) != (first.content.shape[0], first.content.shape[2]):
            raise ValueError(
                f"group {g.name!r}: content {tuple(g.content.shape)} does not match group "
                f"{first.name!r} {tuple(first.content.shape)} in batch size / channels"
            )
        if g.reference_points.shape[-1] != first.reference_points.shape[-1]:
            raise ValueError(
                f"groups {first.name!r} and {g.name!r} mix 2-d reference points and 4-d boxes "
                "(the decoder needs one kind)"
            )


def assemble_query_groups(groups, blocked=()):
    """
    Concatenate query groups for the decoder and build its self-attention mask.

    Args:
        groups (list[QueryGroup]): in decoder order.
        blocked: iterable of (viewer, seen) names; ``viewer`` queries may not attend to ``seen`` ones.
    Returns:
        :class:`AssembledQueries`.
    """
    groups = list(groups)
    _check(groups)
    slices, start = {}, 0
    for g in groups:
        slices[g.name] = slice(start, start + len(g))
        start += len(g)
    blocked = [tuple(p) for p in blocked]
    for viewer, seen in blocked:
        for name in (viewer, seen):
            if name not in slices:
                raise ValueError(f"blocked pair ({viewer!r}, {seen!r}): no group {name!r} in {list(slices)}")

    if len(groups) == 1:
        g = groups[0]
        content, position, refs = g.content, g.position, g.reference_points
    else:
        content = torch.cat([g.content for g in groups], 1)
        position = torch.cat([g.position for g in groups], 1)
        refs = torch.cat([g.reference_points for g in groups], 1)

    attn_mask = None
    if blocked:
        # group-level visibility, expanded to queries (many small groups stay cheap)
        index = {g.name: i for i, g in enumerate(groups)}
        group_blocked = torch.zeros((len(groups), len(groups)), dtype=torch.bool)
        rows, cols = zip(*[(index[v], index[s]) for v, s in blocked])
        group_blocked[list(rows), list(cols)] = True
        nonempty = torch.tensor([len(g) > 0 for g in groups])
        empty_rows = (group_blocked | ~nonempty[None]).all(1) & nonempty
        if empty_rows.any():
            name = groups[int(empty_rows.nonzero()[0])].name
            raise ValueError(f"group {name!r} is blocked from every group (its attention would be empty)")
        group_of_query = torch.repeat_interleave(
            torch.arange(len(groups)), torch.tensor([len(g) for g in groups])
        )
        attn_mask = group_blocked[group_of_query][:, group_of_query].to(content.device)
    return AssembledQueries(content, position, refs, attn_mask, slices)


def build_training_query_groups(cfg, num_classes, hidden_dim):
    """``{name: module}`` of the registered training-only query groups that ``cfg`` enables."""
    out = {}
    for name, fn in sorted(TRAINING_QUERY_GROUPS_REGISTRY):
        module = fn(cfg, num_classes, hidden_dim)
        if module is not None:
            out[name] = module
    return out
