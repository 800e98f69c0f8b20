"""Param groups, AdamW and full-model gradient clipping of ddetr_d2.solver."""

import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.solver import build_lr_scheduler
from torch import nn

from ddetr_d2.solver import build_optimizer, get_param_groups


class Toy(nn.Module):
    """Parameter names shaped like the DeformableDETR meta-arch's."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
        self.backbone[0].weight.requires_grad_(False)  # frozen stem
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.sampling_offsets = nn.Linear(4, 6)
        self.transformer.reference_points = nn.Linear(4, 2)
        self.class_embed = nn.Linear(4, 3)
        self.bbox_embed = nn.ModuleList([self.class_embed, self.class_embed])  # shared head

    def forward(self, x):
        f = self.backbone(x).mean((2, 3))
        return (
            self.transformer.encoder.sampling_offsets(f).sum()
            + self.transformer.reference_points(f).sum()
            + self.class_embed(f).sum()
        )


def _cfg(clip_type="full_model", clip_value=0.1):
    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.5
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = clip_value
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    return cfg


def test_param_groups():
    model = Toy()
    groups = {g["name"]: g for g in get_param_groups(_cfg(), model)}
    names = {id(p): n for n, p in model.named_parameters()}
    got = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert got["backbone"] == [
        "backbone.0.bias",
        "backbone.1.bias",
        "backbone.1.weight",
    ]  # frozen weight skipped
    assert got["linear_proj"] == sorted(
        n for n in names.values() if "sampling_offsets" in n or "reference_points" in n
    )
    assert got["default"] == ["class_embed.bias", "class_embed.weight"]  # shared head listed once
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["linear_proj"]["lr"] == pytest.approx(5e-4)
    assert groups["default"]["lr"] == pytest.approx(1e-3)
    assert all(g["weight_decay"] == 1e-4 for g in groups.values())  # official: decay on every group


def test_full_model_clipping_matches_manual_adamw():
    torch.manual_seed(0)
    model = Toy()
    ref = copy.deepcopy(model)
    opt = build_optimizer(_cfg(), model)
    ref_groups = get_param_groups(_cfg(), ref)
    ref_opt = torch.optim.AdamW(ref_groups, lr=1e-3, weight_decay=1e-4)
    x = torch.randn(2, 3, 8, 8)
    for step in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            (m(x) * 100).backward()  # large gradients: clipping is active
        params = [p for g in ref_groups for p in g["params"]]
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        assert total > 1.0
        # reference: scale every gradient by the same factor so the global norm becomes 0.1
        for p in params:
            p.grad.mul_(0.1 / (total + 1e-6))
        opt.step()
        ref_opt.step()
        for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{n} at step {step}")


def test_per_parameter_clipping_is_different_and_still_supported():
    torch.manual_seed(0)
    a, b = Toy(), Toy()
    b.load_state_dict(a.state_dict())
    opt_full = build_optimizer(_cfg("full_model", 0.1), a)
    opt_norm = build_optimizer(_cfg("norm", 0.1), b)
    x = torch.randn(2, 3, 8, 8)
    for m, o in ((a, opt_full), (b, opt_norm)):
        (m(x) * 100).backward()
        o.step()
    grads_a = [p.grad.norm() for p in a.parameters() if p.grad is not None]
    grads_b = [p.grad.norm() for p in b.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack(grads_a)) == pytest.approx(0.1, rel=1e-4)
    assert max(grads_b) <= 0.1 + 1e-6 and torch.linalg.vector_norm(torch.stack(grads_b)) > 0.11


def test_bad_optimizer_name_and_lr_schedule():
    cfg = _cfg()
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="LAMB"):
        build_optimizer(cfg, Toy())
    cfg = _cfg()
    cfg.SOLVER.STEPS = (4,)
    cfg.SOLVER.MAX_ITER = 6
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.GAMMA = 0.1
    opt = build_optimizer(cfg, Toy())
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(6):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    base = [1e-4, 5e-4, 1e-3]
    assert lrs[0] == pytest.approx(base) and lrs[3] == pytest.approx(base)  # no warm-up (official StepLR)
    assert lrs[4] == pytest.approx([v * 0.1 for v in base])  # multipliers survive the step decay
