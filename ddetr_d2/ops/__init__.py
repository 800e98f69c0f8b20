"""Multi-scale deformable attention: CUDA kernel, C++ CPU kernel and a pure-PyTorch reference.

Importable with torch alone (no detectron2), so the op can be tested and benchmarked anywhere.
"""
from .ms_deform_attn import MSDeformAttn
from .ms_deform_attn_export import ms_deform_attn_gather, msda_export_formulation
from .ms_deform_attn_function import ms_deform_attn
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_gather",
    "ms_deform_attn_pytorch",
    "msda_export_formulation",
]
