"""Deformable DETR as a Detectron2 meta-architecture."""

import copy
import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import box_convert

from ..config import check_model_config
from ..errors import ConfigError
from .backbone import build_input_proj, multi_scale_features
from .box_ops import inverse_sigmoid
from .criterion import SetCriterion
from .deformable_transformer import DeformableTransformer
from .inference_precision import check_inference_dtype, inference_autocast, use_channels_last
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .query_groups import QueryGroup, assemble_query_groups, build_training_query_groups

__all__ = ["DeformableDETR", "MLP"]


class MLP(nn.Module):
    """Linear layers with ReLU in between (official ``MLP``; parameters under ``layers``)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


@META_ARCH_REGISTRY.register()
class DeformableDETR(nn.Module):
    """
    Deformable DETR (Zhu et al., ICLR 2021) on a Detectron2 backbone: plain, with iterative box
    refinement, or two-stage. Submodule names follow the official implementation: ``backbone``,
    ``input_proj``, ``transformer``, ``query_embed``, ``class_embed``, ``bbox_embed``.

    Training returns the weighted losses; inference returns ``[{"instances": Instances}]`` with
    ``pred_boxes``, ``scores``, ``pred_classes`` and ``query_indices`` in original image coordinates.

    The decoder's queries are assembled by ``query_groups.assemble_query_groups``: the detector's own
    group ``"detect"``, plus, in training only, the groups of the modules in ``training_groups``
    (e.g. denoising; state-dict prefix ``training_groups.``, unused at inference).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone,
        in_features,
        transformer,
        criterion,
        num_classes,
        num_queries,
        num_feature_levels,
        pixel_mean,
        pixel_std,
        aux_loss=True,
        with_box_refine=False,
        two_stage=False,
        detections_per_image=100,
        per_image_features=True,
        training_groups=None,
        inference_dtype="float32",
        inference_channels_last=True,
    ):
        super().__init__()
        if two_stage and not with_box_refine:
            # as the official code (whose two-stage path indexes the refinement heads) and HF
            raise ValueError("MODEL.DEFORMABLE_DETR.TWO_STAGE requires WITH_BOX_REFINE: True")
        if two_stage != transformer.two_stage:
            raise ValueError(f"two_stage={two_stage} but transformer.two_stage={transformer.two_stage}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.detections_per_image = detections_per_image
        self.per_image_features = per_image_features
        self.inference_dtype = check_inference_dtype(inference_dtype)
        self.inference_channels_last = inference_channels_last
        self.in_features = list(in_features)
        self.criterion = criterion
        # training-only query groups (name -> module, see query_groups.py); empty by default
        self.training_groups = nn.ModuleDict(training_groups or {})

        self.transformer = transformer
        # one switch for batch independence (see MODEL.DEFORMABLE_DETR.PER_IMAGE_FEATURES)
        self.transformer.exclude_padding_proposals = per_image_features
        hidden_dim = transformer.d_model
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.backbone = backbone
        shapes = backbone.output_shape()
        self.input_proj = build_input_proj(
            [shapes[f].channels for f in self.in_features], hidden_dim, num_feature_levels
        )
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        # head init (official): class prior 0.01, last box layer zero
        bias_value = -math.log((1 - 0.01) / 0.01)
        class_embed.bias.data = torch.ones(num_classes) * bias_value
        nn.init.constant_(bbox_embed.layers[-1].weight.data, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias.data, 0)

        # two-stage: one extra head pair (index num_layers) scores the encoder proposals
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            # independent (deep-copied, identically initialised) heads; the decoder refines with them
            self.class_embed = nn.ModuleList([copy.deepcopy(class_embed) for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([copy.deepcopy(bbox_embed) for _ in range(num_pred)])
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias.data[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            # one head shared by all layers
            nn.init.constant_(bbox_embed.layers[-1].bias.data[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])
            self.transformer.decoder.bbox_embed = None
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias.data[2:], 0.0)

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        check_model_config(cfg)
        c = cfg.MODEL.DEFORMABLE_DETR
        backbone = build_backbone(cfg)
        n_levels = c.NUM_FEATURE_LEVELS
        listed = list(c.IN_FEATURES)
        if n_levels < 1:
            raise ConfigError(f"MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS must be >= 1, got {n_levels}")
        if not listed:
            raise ConfigError("MODEL.DEFORMABLE_DETR.IN_FEATURES is empty (e.g. ['res3', 'res4', 'res5'])")
        # the last NUM_FEATURE_LEVELS listed features (single-scale: the coarsest one)
        in_features = listed[-min(n_levels, len(listed)) :]
        available = list(backbone.output_shape())
        missing = [f for f in in_features if f not in available]
        if missing:
            raise ConfigError(
                f"MODEL.DEFORMABLE_DETR.IN_FEATURES: {missing} not produced by the backbone "
                f"{cfg.MODEL.BACKBONE.NAME}; it produces {available} (for a ResNet, set "
                "MODEL.RESNETS.OUT_FEATURES)"
            )
        if c.MIXED_QUERY_SELECTION and not c.TWO_STAGE:
            raise ConfigError("MODEL.DEFORMABLE_DETR.MIXED_QUERY_SELECTION needs TWO_STAGE: True")
        if c.LOOK_FORWARD_TWICE and not c.WITH_BOX_REFINE:
            raise ConfigError("MODEL.DEFORMABLE_DETR.LOOK_FORWARD_TWICE needs WITH_BOX_REFINE: True")
        transformer = DeformableTransformer(
            d_model=c.HIDDEN_DIM,
            nhead=c.NHEADS,
            num_encoder_layers=c.ENC_LAYERS,
            num_decoder_layers=c.DEC_LAYERS,
            dim_feedforward=c.DIM_FEEDFORWARD,
            dropout=c.DROPOUT,
            num_feature_levels=n_levels,
            dec_n_points=c.DEC_N_POINTS,
            enc_n_points=c.ENC_N_POINTS,
            two_stage=c.TWO_STAGE,
            two_stage_num_proposals=c.NUM_QUERIES,
            im2col_step=c.IM2COL_STEP,
            mixed_query_selection=c.MIXED_QUERY_SELECTION,
            look_forward_twice=c.LOOK_FORWARD_TWICE,
        )
        matcher = HungarianMatcher(
            cost_class=c.COST_CLASS,
            cost_bbox=c.COST_BBOX,
            cost_giou=c.COST_GIOU,
            focal_alpha=c.FOCAL_ALPHA,
            focal_gamma=c.FOCAL_GAMMA,
        )
        weight_dict = {"loss_ce": c.CLASS_WEIGHT, "loss_bbox": c.BBOX_WEIGHT, "loss_giou": c.GIOU_WEIGHT}
        # official: with AUX_LOSS False the proposal (_enc) losses are left out of the total too
        criterion = SetCriterion(
            c.NUM_CLASSES, matcher, weight_dict, c.FOCAL_ALPHA, c.FOCAL_GAMMA, enc_loss=c.AUX_LOSS
        )
        return {
            "backbone": backbone,
            "in_features": in_features,
            "transformer": transformer,
            "criterion": criterion,
            "num_classes": c.NUM_CLASSES,
            "num_queries": c.NUM_QUERIES,
            "num_feature_levels": n_levels,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "aux_loss": c.AUX_LOSS,
            "with_box_refine": c.WITH_BOX_REFINE,
            "two_stage": c.TWO_STAGE,
            "detections_per_image": c.DETECTIONS_PER_IMAGE,
            "per_image_features": c.PER_IMAGE_FEATURES,
            "inference_dtype": c.INFERENCE_DTYPE,
            "inference_channels_last": c.INFERENCE_CHANNELS_LAST,
            "training_groups": build_training_query_groups(cfg, c.NUM_CLASSES, c.HIDDEN_DIM),
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ inputs
    def preprocess_image(self, batched_inputs):
        """Normalise and zero-pad the ``batched_inputs`` images into an ImageList (backbone divisibility)."""
        images = []
        for x in batched_inputs:
            img = x["image"]
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"'image' must be a (3, H, W) tensor, got shape {tuple(img.shape)}")
            images.append((img.to(self.device).float() - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def prepare_features(self, images):
        """
        Backbone, input projections and position embeddings.
        Args:
            images (ImageList): normalised images (``preprocess_image``).
        Returns:
            srcs: list of L (N, C, H_l, W_l); masks: list of L (N, H_l, W_l) bool (True = padding);
            pos_embeds: list of L (N, C, H_l, W_l) (without level_embed, which the transformer adds).
        """
        if use_channels_last(self.inference_channels_last, self.training, images.tensor):
            images = ImageList(
                images.tensor.contiguous(memory_format=torch.channels_last), images.image_sizes
            )
        srcs, masks = multi_scale_features(
            self.backbone, self.input_proj, self.in_features, images, per_image=self.per_image_features
        )
        pos_embeds = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        return srcs, masks, pos_embeds

    def prepare_targets(self, instances, image_sizes):
        """Instances (absolute XYXY in the resized image) -> dicts of labels and normalised cxcywh boxes."""
        targets = []
        for inst, (h, w) in zip(instances, image_sizes):
            inst = inst.to(self.device)
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float, device=self.device)
            boxes = box_convert(inst.gt_boxes.tensor.float() / scale, "xyxy", "cxcywh")
            labels = inst.gt_classes.long()
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"gt_classes {labels.tolist()} outside [0, {self.num_classes}) "
                    "(MODEL.DEFORMABLE_DETR.NUM_CLASSES; D2 contiguous ids)"
                )
            targets.append({"labels": labels, "boxes": boxes})
        return targets

    # ------------------------------------------------------------------ heads
    def predict_from_decoder(self, hs, init_reference, inter_references):
        """
        Per-layer class logits (n_dec, N, Q, K) and boxes (n_dec, N, Q, 4) cxcywh in [0, 1].
        Layer l is offset from the reference points it was fed (init for l = 0, else layer l-1's).
        """
        classes, coords = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            tmp = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                tmp = tmp + reference
            else:
                tmp = torch.cat([tmp[..., :2] + reference, tmp[..., 2:]], -1)
            classes.append(self.class_embed[lvl](hs[lvl]))
            coords.append(tmp.sigmoid())
        return torch.stack(classes), torch.stack(coords)

    def _layer_outputs(self, outputs_class, outputs_coord):
        """(n_dec, N, Q, K), (n_dec, N, Q, 4) -> dict of the last layer (+ ``aux_outputs``)."""
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])
            ]
        return out

    def forward_outputs(self, images, targets=None):
        """
        Raw outputs of an ImageList: official dict (pred_logits, pred_boxes, aux_outputs, enc_outputs)
        of the detector's queries. In training with ``targets``, the training-only query groups join
        the decoder; then ``query_groups`` ({group name: dict like the above}) and
        ``query_group_meta`` ({module name: what its ``make_groups`` returned for its losses}).
        """
        srcs, masks, pos_embeds = self.prepare_features(images)
        enc = self.transformer.forward_encoder(srcs, masks, pos_embeds)
        query_embed = None if self.two_stage else self.query_embed.weight
        tgt, ref, query_pos, enc_cls, enc_coord = self.transformer.prepare_queries(enc, query_embed)
        groups, blocked, metas = [QueryGroup("detect", tgt, query_pos, ref)], [], {}
        if self.training and targets is not None:
            context = {"enc": enc, "enc_outputs_class": enc_cls, "enc_outputs_coord_unact": enc_coord}
            for name, module in self.training_groups.items():
                extra, extra_blocked, metas[name] = module.make_groups(
                    targets, groups, self.transformer, context
                )
                groups += extra
                blocked += extra_blocked
        queries = assemble_query_groups(groups, blocked)
        hs, init_ref, inter_refs = self.transformer.forward_decoder(
            queries.content, queries.reference_points, queries.position, enc, queries.attn_mask
        )
        outputs_class, outputs_coord = self.predict_from_decoder(hs, init_ref, inter_refs)
        per_class, per_coord = queries.split(outputs_class, 2), queries.split(outputs_coord, 2)
        out = self._layer_outputs(per_class.pop("detect"), per_coord.pop("detect"))
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_cls, "pred_boxes": enc_coord.sigmoid()}
        if per_class:
            out["query_groups"] = {k: self._layer_outputs(per_class[k], per_coord[k]) for k in per_class}
            out["query_group_meta"] = metas
        return out

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        if self.training:
            if any("instances" not in x for x in batched_inputs):
                raise ValueError("training needs 'instances' in every input dict")
            targets = self.prepare_targets([x["instances"] for x in batched_inputs], images.image_sizes)
            out = self.forward_outputs(images, targets)
            losses = self.criterion(out, targets)
            for name, module in self.training_groups.items():
                losses.update(
                    module.losses(
                        out.get("query_groups", {}),
                        targets,
                        out.get("query_group_meta", {}).get(name),
                        self.criterion,
                    )
                )
            return losses
        # MODEL.DEFORMABLE_DETR.INFERENCE_DTYPE: bfloat16 runs the dense layers under autocast
        with inference_autocast(self.inference_dtype, images.tensor.device.type):
            out = self.forward_outputs(images)
        results = self.inference(out["pred_logits"].float(), out["pred_boxes"].float(), images.image_sizes)
        processed = []
        for res, x, size in zip(results, batched_inputs, images.image_sizes):
            h = x.get("height", size[0])
            w = x.get("width", size[1])
            processed.append({"instances": detector_postprocess(res, h, w)})
        return processed

    def inference(self, pred_logits, pred_boxes, image_sizes):
        """
        Top-``detections_per_image`` (query, class) pairs by sigmoid score (official ``PostProcess``).
        Args:
            pred_logits (N, Q, K), pred_boxes (N, Q, 4) normalised cxcywh, image_sizes list of (h, w).
        Returns:
            list of Instances in the resized (unpadded) image coordinates.
        """
        results = []
        prob = pred_logits.sigmoid()
        n, q, k = prob.shape
        topk = min(self.detections_per_image, q * k)
        for i, (h, w) in enumerate(image_sizes):
            scores, idx = torch.topk(prob[i].reshape(-1), topk)
            query = torch.div(idx, k, rounding_mode="floor")
            labels = idx % k
            boxes = box_convert(pred_boxes[i][query], "cxcywh", "xyxy")
            boxes = boxes * torch.as_tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            res = Instances((h, w))
            res.pred_boxes = Boxes(boxes)
            res.scores = scores
            res.pred_classes = labels
            res.query_indices = query
            results.append(res)
        return results
