"""
State-dict converters into ddetr-d2's parameter names.

Three sources are understood:

* the official fundamentalvision/Deformable-DETR checkpoints (``convert_official_state_dict``),
* Hugging Face ``DeformableDetrForObjectDetection`` (``convert_hf_state_dict``), with either the
  timm ResNet backbone (the one the ``SenseTime/deformable-detr*`` checkpoints use) or the
  ``transformers`` ResNet backbone,
* torchvision ImageNet ResNets (``convert_torchvision_resnet``), giving a Detectron2 backbone
  dict to use as ``MODEL.WEIGHTS``.

The converters are pure: they take a ``{name: tensor}`` mapping and return a new one. Reading
and writing files is separate (``load_hf``, ``load_state_dict_file``, ``save_detector``,
``save_backbone``; writes are atomic), and ``convert_checkpoint`` runs a whole file-to-file
conversion (``tools/convert_weights.py`` is its command line). Our transformer and heads keep the
official module names, so the official -> ours conversion is the identity outside the backbone,
whose torchvision names are renamed to Detectron2's ResNet names. The HF converter first turns
HF names into official ones, then applies the official converter. ``docs/weight_conversion.md``
has the full mapping tables.

Errors are ``ConversionError`` (a ``WeightsError``, hence a ``UserError`` and ``ValueError``) and
name the offending file or keys.
"""

import os
import pickle
import re
import tempfile
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Sequence

import torch

from .errors import WeightsError

__all__ = [
    "BACKBONE_PREFIX",
    "COCO_CATEGORY_IDS",
    "ConversionError",
    "build_model_state",
    "check_state_dict",
    "coco_91_to_80",
    "convert_checkpoint",
    "convert_hf_state_dict",
    "convert_official_state_dict",
    "convert_torchvision_resnet",
    "d2_resnet_to_torchvision",
    "hf_to_official_state_dict",
    "infer_variant",
    "load_hf",
    "load_state_dict_file",
    "save_backbone",
    "save_detector",
    "to_official_state_dict",
]

# Where the Detectron2 ResNet lives inside our meta-architecture.
BACKBONE_PREFIX = "backbone."
# Where the backbone lives in an official checkpoint (``Joiner(Backbone, PositionEmbedding)``).
OFFICIAL_BACKBONE_PREFIX = "backbone.0.body."

# The 80 COCO "thing" category ids in increasing order: Detectron2's contiguous id i is
# COCO_CATEGORY_IDS[i]; the official model (91 outputs) uses the category id as class index.
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


class ConversionError(WeightsError):
    """A state dict is not in the expected format; the message names the keys involved."""


def _fmt_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def _backbone_prefix(prefix: str) -> str:
    """``--backbone-prefix`` as a module path ending in '.': 'backbone' -> 'backbone.' ('' stays '')."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    if prefix and not re.fullmatch(r"(\w+\.)+", prefix):
        raise ConversionError(
            f"backbone prefix {prefix!r} is not a module path such as 'backbone.' or 'backbone.bottom_up.'"
        )
    return prefix


# A Detectron2 ResNet key, with or without a prefix: the file is in ddetr-d2's own layout.
_OURS_KEY = re.compile(r"(^|\.)(stem\.conv1\.weight|res[2-5]\.\d+\.conv1\.weight)$")
_NO_CONVERSION_NEEDED = "no conversion is needed: use the file as MODEL.WEIGHTS"


def _ours_key(sd) -> str | None:
    """A key showing that ``sd`` is already in ddetr-d2's (Detectron2's) names, or None."""
    if not isinstance(sd, Mapping):
        return None
    return next((k for k in sd if isinstance(k, str) and _OURS_KEY.search(k)), None)


def _layout_hint(sd, source: str) -> str:
    """'; <what to do>' for the layout ``sd`` seems to be in when it is not ``source``'s ('' if unknown)."""
    keys = [k for k in sd if isinstance(k, str)] if isinstance(sd, Mapping) else []
    ours = _ours_key(sd)
    if ours is not None:
        return f"; {ours} is already a ddetr-d2 / Detectron2 name: {_NO_CONVERSION_NEEDED}"
    if source != "hf" and any(k.startswith("model.") for k in keys):
        return "; a Hugging Face state dict? use --from hf"
    official = (OFFICIAL_BACKBONE_PREFIX, "module." + OFFICIAL_BACKBONE_PREFIX)
    if source != "official" and any(k.startswith(official) for k in keys):
        return "; an official Deformable-DETR checkpoint? use --from official"
    if source != "torchvision" and "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "; a torchvision ResNet? use --from torchvision"
    return ""


# ---------------------------------------------------------------------------------------------
# torchvision ResNet <-> Detectron2 ResNet
# ---------------------------------------------------------------------------------------------
_TV_STEM_CONV = re.compile(r"^conv1\.weight$")
_TV_STEM_BN = re.compile(r"^bn1\.(weight|bias|running_mean|running_var)$")
_TV_CONV = re.compile(r"^layer([1-4])\.(\d+)\.conv([1-3])\.weight$")
_TV_BN = re.compile(r"^layer([1-4])\.(\d+)\.bn([1-3])\.(weight|bias|running_mean|running_var)$")
_TV_DOWN_CONV = re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$")
_TV_DOWN_BN = re.compile(r"^layer([1-4])\.(\d+)\.downsample\.1\.(weight|bias|running_mean|running_var)$")


def _torchvision_to_d2_key(key: str) -> str | None:
    """One torchvision ResNet key -> Detectron2 ResNet key; None for keys D2 has no use for."""
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
        return None
    if _TV_STEM_CONV.match(key):
        return "stem.conv1.weight"
    m = _TV_STEM_BN.match(key)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = _TV_CONV.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.weight"
    m = _TV_BN.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.norm.{m.group(4)}"
    m = _TV_DOWN_CONV.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.weight"
    m = _TV_DOWN_BN.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.norm.{m.group(3)}"
    raise KeyError(key)


_D2_STEM_CONV = re.compile(r"^stem\.conv1\.weight$")
_D2_STEM_BN = re.compile(r"^stem\.conv1\.norm\.(weight|bias|running_mean|running_var)$")
_D2_CONV = re.compile(r"^res([2-5])\.(\d+)\.conv([1-3])\.weight$")
_D2_BN = re.compile(r"^res([2-5])\.(\d+)\.conv([1-3])\.norm\.(weight|bias|running_mean|running_var)$")
_D2_SC_CONV = re.compile(r"^res([2-5])\.(\d+)\.shortcut\.weight$")
_D2_SC_BN = re.compile(r"^res([2-5])\.(\d+)\.shortcut\.norm\.(weight|bias|running_mean|running_var)$")


def _d2_to_torchvision_key(key: str) -> str:
    """Inverse of ``_torchvision_to_d2_key``."""
    if _D2_STEM_CONV.match(key):
        return "conv1.weight"
    m = _D2_STEM_BN.match(key)
    if m:
        return f"bn1.{m.group(1)}"
    m = _D2_CONV.match(key)
    if m:
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.conv{m.group(3)}.weight"
    m = _D2_BN.match(key)
    if m:
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.bn{m.group(3)}.{m.group(4)}"
    m = _D2_SC_CONV.match(key)
    if m:
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.0.weight"
    m = _D2_SC_BN.match(key)
    if m:
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.1.{m.group(3)}"
    raise KeyError(key)


def convert_torchvision_resnet(sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """
    torchvision ``ResNet`` state dict (also timm's ResNet, same names) -> Detectron2 ResNet names.

    ``conv1/bn1 -> stem.conv1(.norm)``, ``layerN -> res(N+1)``, ``bnK -> convK.norm``,
    ``downsample.0/1 -> shortcut(.norm)``; ``fc.*`` and ``num_batches_tracked`` are dropped.
    The result has no prefix (as Detectron2's ImageNet ``.pkl`` files), so it is meant to be
    loaded with matching heuristics, or prefixed by the caller.

    Raises ConversionError naming the keys that are not ResNet keys.
    """
    if not isinstance(sd, Mapping):
        raise ConversionError(
            f"expected a state dict (a mapping of names to tensors), got {type(sd).__name__}"
        )
    out, unknown = OrderedDict(), []
    for k, v in sd.items():
        try:
            new_k = _torchvision_to_d2_key(k)
        except KeyError:
            unknown.append(k)
            continue
        if new_k is not None:
            out[new_k] = v
    if unknown:
        raise ConversionError(
            f"{len(unknown)} keys are not torchvision ResNet keys: {_fmt_keys(unknown)} "
            f"(expected conv1.*, bn1.*, layer1-4.*, fc.*{_layout_hint(sd, 'torchvision')})"
        )
    if "stem.conv1.weight" not in out:
        raise ConversionError("no 'conv1.weight' (the ResNet stem) in the state dict")
    return out


def d2_resnet_to_torchvision(sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Detectron2 ResNet names (no prefix) -> torchvision names. Raises on other keys."""
    out, unknown = OrderedDict(), []
    for k, v in sd.items():
        try:
            out[_d2_to_torchvision_key(k)] = v
        except KeyError:
            unknown.append(k)
    if unknown:
        raise ConversionError(f"{len(unknown)} keys are not Detectron2 ResNet keys: {_fmt_keys(unknown)}")
    return out


# ---------------------------------------------------------------------------------------------
# transformers' own ResNet (``use_timm_backbone=False``) -> torchvision names
# ---------------------------------------------------------------------------------------------
_HFR_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(\w+)$")
_HFR_LAYER = re.compile(
    r"^encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.(convolution|normalization)\.(\w+)$"
)
_HFR_SHORTCUT = re.compile(
    r"^encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(\w+)$"
)


def _hf_resnet_to_torchvision_key(key: str) -> str | None:
    if key.endswith("num_batches_tracked"):
        return None
    m = _HFR_STEM.match(key)
    if m:
        return ("conv1." if m.group(1) == "convolution" else "bn1.") + m.group(2)
    m = _HFR_LAYER.match(key)
    if m:
        stage, block, k, kind, p = m.groups()
        name = f"conv{int(k) + 1}" if kind == "convolution" else f"bn{int(k) + 1}"
        return f"layer{int(stage) + 1}.{block}.{name}.{p}"
    m = _HFR_SHORTCUT.match(key)
    if m:
        stage, block, kind, p = m.groups()
        return f"layer{int(stage) + 1}.{block}.downsample.{0 if kind == 'convolution' else 1}.{p}"
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# Hugging Face -> official names
# ---------------------------------------------------------------------------------------------
_HF_BACKBONE = "model.backbone.conv_encoder.model."
# (regex on the HF key without "model.", replacement giving the official key)
_HF_ENC_RULES = [
    (
        re.compile(
            r"^encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\."
        ),
        r"transformer.encoder.layers.\1.self_attn.\2.",
    ),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\."), r"transformer.encoder.layers.\1.norm1."),
    (re.compile(r"^encoder\.layers\.(\d+)\.fc1\."), r"transformer.encoder.layers.\1.linear1."),
    (re.compile(r"^encoder\.layers\.(\d+)\.fc2\."), r"transformer.encoder.layers.\1.linear2."),
    (re.compile(r"^encoder\.layers\.(\d+)\.final_layer_norm\."), r"transformer.encoder.layers.\1.norm2."),
    (
        re.compile(r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\."),
        r"transformer.decoder.layers.\1.self_attn.out_proj.",
    ),
    (re.compile(r"^decoder\.layers\.(\d+)\.self_attn_layer_norm\."), r"transformer.decoder.layers.\1.norm2."),
    (
        re.compile(
            r"^decoder\.layers\.(\d+)\.encoder_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\."
        ),
        r"transformer.decoder.layers.\1.cross_attn.\2.",
    ),
    (
        re.compile(r"^decoder\.layers\.(\d+)\.encoder_attn_layer_norm\."),
        r"transformer.decoder.layers.\1.norm1.",
    ),
    (re.compile(r"^decoder\.layers\.(\d+)\.fc1\."), r"transformer.decoder.layers.\1.linear1."),
    (re.compile(r"^decoder\.layers\.(\d+)\.fc2\."), r"transformer.decoder.layers.\1.linear2."),
    (re.compile(r"^decoder\.layers\.(\d+)\.final_layer_norm\."), r"transformer.decoder.layers.\1.norm3."),
    (re.compile(r"^decoder\.(bbox_embed|class_embed)\."), r"transformer.decoder.\1."),
    (re.compile(r"^(level_embed)$"), r"transformer.\1"),
    (
        re.compile(r"^(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\."),
        r"transformer.\1.",
    ),
    (re.compile(r"^query_position_embeddings\."), r"query_embed."),
    (re.compile(r"^input_proj\."), r"input_proj."),
]
_HF_QKV = re.compile(r"^decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_HF_HEADS = re.compile(r"^(class_embed|bbox_embed)\.")


def hf_to_official_state_dict(hf_sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """
    HF ``DeformableDetrForObjectDetection`` state dict -> official Deformable-DETR names.

    The decoder self-attention's separate ``q_proj/k_proj/v_proj`` are concatenated (q, k, v
    order) into ``nn.MultiheadAttention``'s ``in_proj_weight/in_proj_bias``. The backbone is
    written with torchvision names under ``backbone.0.body.``.
    """
    if not isinstance(hf_sd, Mapping):
        raise ConversionError(f"expected a state dict, got {type(hf_sd).__name__}")
    if not any(k.startswith("model.") for k in hf_sd):
        raise ConversionError(
            "not a Hugging Face DeformableDetrForObjectDetection state dict: no 'model.*' key "
            f"(first keys: {_fmt_keys(list(hf_sd)[:5])}{_layout_hint(hf_sd, 'hf')})"
        )
    out, unknown = OrderedDict(), []
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in hf_sd.items():
        if k.startswith(_HF_BACKBONE):
            bk = k[len(_HF_BACKBONE) :]
            if bk.startswith(("embedder.", "encoder.stages.")):  # transformers ResNet
                try:
                    tv = _hf_resnet_to_torchvision_key(bk)
                except KeyError:
                    unknown.append(k)
                    continue
            else:  # timm ResNet: torchvision names already
                tv = None if bk.endswith("num_batches_tracked") else bk
            if tv is not None:
                out[OFFICIAL_BACKBONE_PREFIX + tv] = v
            continue
        if _HF_HEADS.match(k):
            out[k] = v
            continue
        if not k.startswith("model."):
            unknown.append(k)
            continue
        sub = k[len("model.") :]
        m = _HF_QKV.match(sub)
        if m:
            layer, which, p = m.groups()
            qkv.setdefault(f"transformer.decoder.layers.{layer}.self_attn.in_proj_{p}", {})[which] = v
            continue
        for pattern, repl in _HF_ENC_RULES:
            if pattern.match(sub):
                out[pattern.sub(repl, sub, count=1)] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise ConversionError(f"{len(unknown)} Hugging Face keys have no known mapping: {_fmt_keys(unknown)}")
    for name, parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"incomplete q/k/v projections for {name}: only {sorted(parts)} found")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ---------------------------------------------------------------------------------------------
# official <-> ours
# ---------------------------------------------------------------------------------------------
_LAYER_IDX = re.compile(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.")
_HEAD_KEY = re.compile(r"^(transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)$")


def infer_variant(sd: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """
    Read the architecture off official-style keys: ``enc_layers``, ``dec_layers``, ``two_stage``
    (an ``enc_output`` layer exists), ``with_box_refine`` (``transformer.decoder.bbox_embed`` exists
    or the per-layer heads hold different tensors), ``num_classes`` (rows of ``class_embed.0``).
    """
    layers = {"encoder": set(), "decoder": set()}
    for k in sd:
        m = _LAYER_IDX.match(k)
        if m:
            layers[m.group(1)].add(int(m.group(2)))
    if "class_embed.0.weight" not in sd:
        raise ConversionError("no 'class_embed.0.weight' key: not a Deformable DETR detector state dict")
    two_stage = any(k.startswith("transformer.enc_output.") for k in sd)
    refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in sd)
    if not refine:  # shared heads are identical at every index; refinement heads are independent
        for name in ("class_embed.{}.weight", "bbox_embed.{}.layers.0.weight"):
            a, b = sd.get(name.format(0)), sd.get(name.format(1))
            if a is not None and b is not None and not torch.equal(a, b):
                refine = True
    return {
        "enc_layers": len(layers["encoder"]),
        "dec_layers": len(layers["decoder"]),
        "two_stage": int(two_stage),
        "with_box_refine": int(refine or two_stage),
        "num_classes": int(sd["class_embed.0.weight"].shape[0]),
    }


def _complete_heads(sd: "OrderedDict[str, torch.Tensor]", variant: Mapping[str, int]) -> None:
    """
    Give every head index its own key, as the official model's state dict does: without box
    refinement the heads are one shared module listed once per decoder layer (copies saved
    with tied weights may be missing), with refinement ``transformer.decoder.bbox_embed`` aliases
    ``bbox_embed``, and in two-stage ``transformer.decoder.class_embed`` aliases ``class_embed``.
    """
    num_pred = variant["dec_layers"] + variant["two_stage"]
    groups: Dict[str, Dict[int, Dict[str, torch.Tensor]]] = {"class_embed": {}, "bbox_embed": {}}
    for k in list(sd):
        m = _HEAD_KEY.match(k)
        if m:
            groups[m.group(2)].setdefault(int(m.group(3)), {})[m.group(4)] = sd.pop(k)
    for head, by_idx in groups.items():
        if not by_idx:
            raise ConversionError(f"no '{head}.*' keys in the state dict")
        bad = [i for i in by_idx if i >= num_pred]
        if bad:
            raise ConversionError(
                f"'{head}' has index {max(bad)} but the model predicts {num_pred} times "
                f"({variant['dec_layers']} decoder layers, two_stage={bool(variant['two_stage'])})"
            )
        for i in range(num_pred):
            if i not in by_idx:
                if variant["with_box_refine"]:
                    raise ConversionError(f"missing '{head}.{i}.*': box refinement needs one head per layer")
                by_idx[i] = by_idx[0]
            for p, v in by_idx[i].items():
                sd[f"{head}.{i}.{p}"] = v
        alias = (head == "bbox_embed" and variant["with_box_refine"]) or (
            head == "class_embed" and variant["two_stage"]
        )
        if alias:
            for i in range(num_pred):
                for p, v in by_idx[i].items():
                    sd[f"transformer.decoder.{head}.{i}.{p}"] = v


def coco_91_to_80(
    sd: Mapping[str, torch.Tensor], two_stage: bool | None = None
) -> "OrderedDict[str, torch.Tensor]":
    """
    Keep the 80 COCO classes of a 91-way (category-id indexed) classifier, in Detectron2's
    contiguous order. The two-stage proposal head (the last ``class_embed``) only uses its
    class 0 (top-k on ``logits[..., 0]``), so it keeps row 0 first, then the first 79 COCO ids.
    """
    out = OrderedDict(sd)
    variant = infer_variant(sd)
    if variant["num_classes"] != 91:
        raise ConversionError(f"class_embed has {variant['num_classes']} outputs; 91->80 needs 91")
    two_stage = bool(variant["two_stage"]) if two_stage is None else two_stage
    enc_idx = variant["dec_layers"] if two_stage else -1
    rows = torch.tensor(COCO_CATEGORY_IDS)
    enc_rows = torch.tensor((0,) + COCO_CATEGORY_IDS[:79])
    for k, v in sd.items():
        m = _HEAD_KEY.match(k)
        if m and m.group(2) == "class_embed":
            out[k] = v.index_select(0, enc_rows if int(m.group(3)) == enc_idx else rows).clone()
    return out


def convert_official_state_dict(
    sd: Mapping[str, torch.Tensor],
    backbone_prefix: str = BACKBONE_PREFIX,
    coco_91_to_80_classes: bool = False,
) -> "OrderedDict[str, torch.Tensor]":
    """
    Official Deformable-DETR ``checkpoint["model"]`` -> ddetr-d2 state dict.

    ``backbone.0.body.<torchvision>`` -> ``backbone_prefix + <Detectron2 ResNet>``; transformer,
    ``input_proj``, ``query_embed`` and heads keep their names (head aliases are completed, see
    ``_complete_heads``). ``coco_91_to_80_classes`` keeps the 80 COCO rows of the classifiers.
    A full checkpoint dict (with "model", "optimizer", ...) is accepted too.
    """
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    if not isinstance(sd, Mapping):
        raise ConversionError(f"expected a state dict, got {type(sd).__name__}")
    backbone_prefix = _backbone_prefix(backbone_prefix)
    if any(k.startswith("module.") for k in sd):
        sd = OrderedDict((k[len("module.") :] if k.startswith("module.") else k, v) for k, v in sd.items())
    if any(k.startswith("model.") for k in sd):
        raise ConversionError(
            "keys start with 'model.': this looks like a Hugging Face state dict (use --from hf)"
        )
    backbone = OrderedDict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    unknown: List[str] = []
    known_top = ("transformer.", "input_proj.", "query_embed.", "class_embed.", "bbox_embed.")
    for k, v in sd.items():
        if k.startswith(OFFICIAL_BACKBONE_PREFIX):
            backbone[k[len(OFFICIAL_BACKBONE_PREFIX) :]] = v
        elif k.startswith(known_top):
            out[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} keys are not official Deformable-DETR keys: {_fmt_keys(unknown)} "
            f"(expected {OFFICIAL_BACKBONE_PREFIX}*, transformer.*, input_proj.*, query_embed.*, "
            f"class_embed.*, bbox_embed.*{_layout_hint(sd, 'official')})"
        )
    if not backbone:
        raise ConversionError(f"no backbone keys ('{OFFICIAL_BACKBONE_PREFIX}*') in the state dict")
    try:
        d2_backbone = convert_torchvision_resnet(backbone)
    except ConversionError as e:
        raise ConversionError(f"backbone ({OFFICIAL_BACKBONE_PREFIX}*): {e}") from None
    variant = infer_variant(out)
    _complete_heads(out, variant)
    if coco_91_to_80_classes:
        out = coco_91_to_80(out, two_stage=bool(variant["two_stage"]))
    result = OrderedDict((backbone_prefix + k, v) for k, v in d2_backbone.items())
    result.update(out)
    return result


def convert_hf_state_dict(
    hf_sd: Mapping[str, torch.Tensor],
    backbone_prefix: str = BACKBONE_PREFIX,
    coco_91_to_80_classes: bool = False,
) -> "OrderedDict[str, torch.Tensor]":
    """HF ``DeformableDetrForObjectDetection`` state dict -> ddetr-d2 (via the official names)."""
    return convert_official_state_dict(
        hf_to_official_state_dict(hf_sd),
        backbone_prefix=backbone_prefix,
        coco_91_to_80_classes=coco_91_to_80_classes,
    )


def to_official_state_dict(
    sd: Mapping[str, torch.Tensor], backbone_prefix: str = BACKBONE_PREFIX
) -> "OrderedDict[str, torch.Tensor]":
    """ddetr-d2 state dict -> official names (the inverse of ``convert_official_state_dict``)."""
    backbone_prefix = _backbone_prefix(backbone_prefix)
    out, unknown = OrderedDict(), []
    for k, v in sd.items():
        if k.startswith(backbone_prefix) and not k.startswith(("transformer.", "input_proj.")):
            try:
                out[OFFICIAL_BACKBONE_PREFIX + _d2_to_torchvision_key(k[len(backbone_prefix) :])] = v
            except KeyError:
                unknown.append(k)
        elif k in ("pixel_mean", "pixel_std"):
            continue
        else:
            out[k] = v
    if unknown:
        raise ConversionError(
            f"{len(unknown)} backbone keys are not Detectron2 ResNet keys: {_fmt_keys(unknown)}"
        )
    return out


def check_state_dict(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], ignore: Sequence[str] = ()
) -> None:
    """
    Raise ConversionError if ``sd`` does not have exactly the keys and shapes of ``expected``
    (e.g. ``model.state_dict()``), naming missing, unexpected and mis-shaped keys.
    Keys containing any of the ``ignore`` substrings are skipped.
    """

    def keep(k):
        return not any(s in k for s in ignore)

    missing = [k for k in expected if keep(k) and k not in sd]
    unexpected = [k for k in sd if keep(k) and k not in expected]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sd
        if keep(k) and k in expected and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys {_fmt_keys(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch in {len(shapes)} keys [{'; '.join(shapes[:12])}]")
    if problems:
        raise ConversionError("converted state dict does not match the model: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# reading and writing checkpoint files
# ---------------------------------------------------------------------------------------------
def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001  (name the file in every failure)
        reason = f"{type(e).__name__}: {e}"
    if path.endswith(".pkl"):  # a Detectron2 pickle (e.g. this tool's .pkl output): read as Detectron2 does
        obj = _detectron2_pickle(path)
        if obj is not None:
            return obj
    raise ConversionError(f"cannot read '{path}' as a torch checkpoint: {reason}")


def _detectron2_pickle(path):
    """A Detectron2 ``.pkl`` checkpoint (numpy arrays under "model") with tensors instead; None if not one."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception:  # noqa: BLE001  (not a pickle either: the caller reports the torch.load error)
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        return None
    model = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in obj["model"].items()}
    return {**obj, "model": model}


def _load_safetensors(path):
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConversionError(
            f"'{path}' is a .safetensors file but the safetensors package is not installed"
        ) from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001  (empty, truncated, corrupt: name the file and the reason)
        size = os.path.getsize(path) if os.path.isfile(path) else "?"
        raise ConversionError(
            f"cannot read '{path}' ({size} bytes) as a safetensors file: {type(e).__name__}: {e} "
            "(truncated or not a safetensors file?)"
        ) from None


def _unwrap(obj, path, keys=("model", "state_dict")):
    """A checkpoint may hold its state dict under "model" / "state_dict"; tensors must be values."""
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and isinstance(obj[k], dict):
                return obj[k]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ConversionError(
        f"'{path}' is not a state dict: expected a mapping of names to tensors (or one under "
        f"{' / '.join(repr(k) for k in keys)}), got {type(obj).__name__}"
        + (f" with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else "")
    )


def load_state_dict_file(path):
    """The state dict of a torch checkpoint file (top level, or under "model" / "state_dict")."""
    return _unwrap(_torch_load(path), path)


def load_hf(path):
    """Read an HF state dict from a save_pretrained folder or a single weights file."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            f = os.path.join(path, name)
            if os.path.isfile(f):
                path = f
                break
        else:
            ours = [
                n for n in ("model_final.pth", "last_checkpoint") if os.path.isfile(os.path.join(path, n))
            ]
            hint = (
                f"; {ours[0]} there looks like a ddetr-d2 training output: its checkpoints need no "
                "conversion, use one as MODEL.WEIGHTS"
                if ours
                else ""
            )
            raise ConversionError(
                f"'{path}' is a folder without model.safetensors or pytorch_model.bin "
                f"(sharded checkpoints are not supported; pass a single weights file){hint}"
            )
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    return load_state_dict_file(path)


def build_model_state(config_file, opts=()):
    """state_dict() of the model a config builds (CPU, random init), to check a conversion against."""
    from detectron2.modeling import build_model

    from .config import build_cfg

    opts = list(opts)
    _check_opts(config_file, opts)
    return build_model(build_cfg(config_file, opts + ["MODEL.DEVICE", "cpu"])).state_dict()


def _check_opts(config_file, opts):
    """``opts`` (what the user typed) configure the model of ``config_file``: no file, no options."""
    if opts and not config_file:
        raise ConversionError(
            f"--opts {' '.join(map(str, opts))} given without --config-file: the options only configure "
            "the model that --config-file builds to check the weights against; add --config-file or drop "
            "--opts"
        )
    if len(opts) % 2:
        raise ConversionError(f"--opts needs KEY VALUE pairs, got an odd number of items: {list(opts)}")


def _check_output(output, suffixes, what="a checkpoint"):
    """Before anything is read: ``output`` can be written (a file name with the right suffix, in an
    existing folder where a file can be created)."""
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise ConversionError(
            f"output '{output}' is a directory: give a file name ending with {' or '.join(suffixes)}"
        )
    if os.path.exists(output) and not os.path.isfile(output):
        raise ConversionError(f"output '{output}' exists and is not a regular file")
    if not os.path.isdir(folder):
        what_is = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise ConversionError(f"output folder '{folder}' {what_is} (for output '{output}')")
    if not output.endswith(suffixes):
        raise ConversionError(f"output '{output}' must end with {' or '.join(suffixes)} ({what})")
    try:  # a test-create where the atomic write puts its temporary file, removed at once
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".check", dir=folder)
    except OSError as e:
        raise ConversionError(
            f"cannot write output '{output}': cannot create a file in folder '{folder}' ({e.strerror or e})"
        ) from None
    os.close(fd)
    os.remove(probe)


def _atomic_dump(output, write_fn):
    from .checkpoint import atomic_write

    _check_output(output, (".pth", ".pkl"))
    try:
        atomic_write(output, write_fn, "wb")
    except OSError as e:  # disk full, quota, ...: the temporary file is gone, an earlier output stays
        raise ConversionError(f"cannot write output '{output}': {type(e).__name__}: {e}") from None


_BACKBONE_FORMAT = "Detectron2 backbone weights format"


def _numpy_state(sd):
    return OrderedDict((k, v.detach().cpu().numpy()) for k, v in sd.items())


def save_detector(sd, output, author):
    """Write ``{"model", "__author__", "matching_heuristics": False}`` to ``output`` (.pth: torch,
    .pkl: pickle of numpy arrays) atomically."""
    ckpt = {"model": sd, "__author__": author, "matching_heuristics": False}
    if output.endswith(".pkl"):
        ckpt["model"] = _numpy_state(sd)
        _atomic_dump(output, lambda f: pickle.dump(ckpt, f))
    else:
        _atomic_dump(output, lambda f: torch.save(ckpt, f))


def save_backbone(sd, output):
    """Detectron2's ImageNet convention, atomically: a pickle of numpy arrays with unprefixed ResNet names."""
    _check_output(output, (".pkl",), _BACKBONE_FORMAT)
    ckpt = {"model": _numpy_state(sd), "__author__": "torchvision", "matching_heuristics": True}
    _atomic_dump(output, lambda f: pickle.dump(ckpt, f))


def _not_ours(sd, path):
    """``sd``, unless it is already in ddetr-d2's layout (a model_final.pth, this tool's output)."""
    key = _ours_key(sd)
    if key is not None:
        raise ConversionError(
            f"'{path}' is already in ddetr-d2's layout (Detectron2 names such as {key}): "
            + _NO_CONVERSION_NEEDED
        )
    return sd


def convert_checkpoint(
    source, input_path, output, coco_91_to_80_classes=False, backbone_prefix=BACKBONE_PREFIX,
    config_file="", opts=(),
):  # fmt: skip
    """
    Convert the ``source`` ("hf", "official" or "torchvision") checkpoint ``input_path`` into
    ``output`` (.pth / .pkl detector checkpoint; .pkl backbone for torchvision); with
    ``config_file`` (+ ``opts``), check the keys and shapes against that config's model first.
    Returns the number of tensors written. Raises :class:`ConversionError`; nothing is written then.
    """
    if source not in ("hf", "official", "torchvision"):
        raise ConversionError(f"unknown source {source!r}: expected hf, official or torchvision")
    opts = list(opts)
    _check_opts(config_file, opts)
    backbone_prefix = _backbone_prefix(backbone_prefix)
    if not os.path.exists(input_path):
        raise ConversionError(f"input '{input_path}' does not exist")
    if source == "torchvision":
        _check_output(output, (".pkl",), _BACKBONE_FORMAT)
        sd = _not_ours(load_state_dict_file(input_path), input_path)
        sd = convert_torchvision_resnet(sd)
        if config_file:
            expected = build_model_state(config_file, opts)
            n = len(backbone_prefix)
            check_state_dict(sd, {k[n:]: v for k, v in expected.items() if k.startswith(backbone_prefix)})
        save_backbone(sd, output)
        return len(sd)
    _check_output(output, (".pth", ".pkl"))
    if source == "hf":
        sd = convert_hf_state_dict(
            _not_ours(load_hf(input_path), input_path),
            backbone_prefix=backbone_prefix,
            coco_91_to_80_classes=coco_91_to_80_classes,
        )
    else:
        sd = convert_official_state_dict(
            _not_ours(load_state_dict_file(input_path), input_path),
            backbone_prefix=backbone_prefix,
            coco_91_to_80_classes=coco_91_to_80_classes,
        )
    if config_file:
        try:
            check_state_dict(sd, build_model_state(config_file, opts))
        except ConversionError as e:
            raise ConversionError(
                f"{e}. The weights are {infer_variant(sd)}; does '{config_file}' (+ --opts) match?"
            ) from None
    save_detector(sd, output, author=f"ddetr-d2 convert_weights.py --from {source}")
    return len(sd)
