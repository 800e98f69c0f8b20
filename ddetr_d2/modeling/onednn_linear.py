"""Float32 linear layers on oneDNN with their weights packed once, for inference-only CPU models.

``MODEL.DEFORMABLE_DETR.INFERENCE_LINEAR_BACKEND``: PyTorch runs a float32 ``nn.Linear`` on the CPU as a
BLAS ``addmm`` (MKL in the official wheels), and Inductor's weight freezing packs float32 weights for MKL too.
On AMD CPUs MKL's single-precision GEMM is markedly slower than oneDNN's: 2 cores of an AVX-512 AMD EPYC,
17,821 x 256 -> 1,024 (the encoder's FFN at 800x1066) 91 ms vs 67 ms, 1,024 -> 256 59 ms vs 44 ms with the
weight packed (docs/benchmarks.md). :func:`use_onednn_linears` swaps the model's ``nn.Linear`` modules for
:class:`PackedLinear`: same parameters (and ``state_dict`` keys), a oneDNN copy of the weight packed once,
and ``torch.ops.mkldnn._linear_pointwise`` in float32 eval-mode forwards without autograd. Anything else
(training, gradients, autocast, another dtype or device, tracing for export) runs the plain ``F.linear``.
Layers with fewer than :data:`PACKED_LINEAR_MIN_WEIGHTS` weights are not swapped: oneDNN's call costs ~15 us
more than ``F.linear``'s, which a small GEMM does not pay back (64 -> 128 on 30 rows: 27 vs 11 us; the
video tracker's d=64 model and its query update run dozens of them per frame).
"""

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INFERENCE_LINEAR_BACKENDS",
    "PACKED_LINEAR_MIN_WEIGHTS",
    "PackedLinear",
    "cpu_vendor",
    "onednn_linear_available",
    "resolve_linear_backend",
    "use_onednn_linears",
]

logger = logging.getLogger(__name__)

INFERENCE_LINEAR_BACKENDS = ("auto", "onednn", "torch")

# in_features x out_features from which use_onednn_linears swaps a layer (128 x 256: the smallest FFN
# measured faster on oneDNN; every layer of the R-50 models' encoder and decoder has at least as many)
PACKED_LINEAR_MIN_WEIGHTS = 128 * 256


@functools.cache
def cpu_vendor():
    """The CPU's ``vendor_id`` from /proc/cpuinfo (e.g. "AuthenticAMD", "GenuineIntel"), "" if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_linear_available():
    """Whether this PyTorch has oneDNN's packed linear ops on the CPU."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def resolve_linear_backend(name):
    """
    ``INFERENCE_LINEAR_BACKEND`` -> whether to use :class:`PackedLinear`: "onednn" yes (ValueError if this
    PyTorch lacks oneDNN), "torch" no, "auto" on AMD CPUs where oneDNN is available (measured faster
    there; on other CPUs PyTorch's own float32 GEMM stays, not having been measured against it).
    """
    if name not in INFERENCE_LINEAR_BACKENDS:
        raise ValueError(
            f"MODEL.DEFORMABLE_DETR.INFERENCE_LINEAR_BACKEND must be one of {INFERENCE_LINEAR_BACKENDS}, "
            f"got {name!r}"
        )
    if name == "torch":
        return False
    if name == "onednn":
        if not onednn_linear_available():
            raise ValueError(
                "MODEL.DEFORMABLE_DETR.INFERENCE_LINEAR_BACKEND onednn: this PyTorch build has no oneDNN "
                "(torch.backends.mkldnn); use auto or torch"
            )
        return True
    return cpu_vendor() == "AuthenticAMD" and onednn_linear_available()


def _compiling():
    return torch.compiler.is_compiling()


class PackedLinear(nn.Linear):
    """
    ``nn.Linear`` whose float32 CPU inference runs oneDNN's inner product on a weight packed once.

    The packed copy is not part of the ``state_dict`` and is re-made when the weight changes in place
    (e.g. ``load_state_dict``; checked in eager mode: a compiled module reads it once, as with weight
    freezing). Shapes as ``nn.Linear``: (*, in_features) -> (*, out_features).
    """

    @classmethod
    def from_linear(cls, linear):
        """A ``PackedLinear`` sharing ``linear``'s weight and bias parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.register_parameter("weight", linear.weight)
        new.register_parameter("bias", linear.bias)
        new.train(linear.training)
        new._pack()
        return new

    @torch.no_grad()
    def _pack(self):
        self._packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
        self._packed_version = self.weight._version

    def _use_packed(self, x):
        return not (
            self.training
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or self.weight.dtype != torch.float32
            or self.weight.device.type != "cpu"
            or torch.is_autocast_cpu_enabled()
            or torch.jit.is_tracing()  # export (ONNX, TorchScript) records aten's linear
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        )

    def forward(self, x):
        if not self._use_packed(x):
            return F.linear(x, self.weight, self.bias)
        if self._packed_weight is None or (not _compiling() and self.weight._version != self._packed_version):
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight, self.bias, "none", [], "")

    def __getstate__(self):
        # oneDNN's opaque tensors cannot be copied or pickled: copies re-pack on their first forward
        state = super().__getstate__()
        state["_packed_weight"] = None
        return state


def use_onednn_linears(module, min_weights=None):
    """
    In place: every ``nn.Linear`` of ``module`` (exactly that class, not subclasses such as
    ``nn.MultiheadAttention``'s ``out_proj``) with at least ``min_weights`` weights (default
    :data:`PACKED_LINEAR_MIN_WEIGHTS`) becomes a :class:`PackedLinear` with the same parameters.
    For inference-only models with their weights loaded. Returns the number of layers swapped.
    """
    if min_weights is None:
        min_weights = PACKED_LINEAR_MIN_WEIGHTS
    if module.training:
        raise ValueError("use_onednn_linears is for inference only: call module.eval() first")
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.numel() >= min_weights:
                setattr(parent, name, PackedLinear.from_linear(child))
                swapped += 1
    logger.debug("%d linear layers on oneDNN with packed weights", swapped)
    return swapped
