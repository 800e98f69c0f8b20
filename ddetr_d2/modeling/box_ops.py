"""Box helpers not provided by torchvision / detectron2."""

import torch

__all__ = ["inverse_sigmoid"]


def inverse_sigmoid(x, eps=1e-5):
    """Logit of ``x`` clamped to [eps, 1 - eps] (as the official code, eps = 1e-5)."""
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)
