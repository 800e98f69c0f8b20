"""Precision of the eval-mode forward (``MODEL.DEFORMABLE_DETR.INFERENCE_DTYPE``)."""

import contextlib
import functools
import logging

import torch

__all__ = ["INFERENCE_DTYPES", "inference_autocast", "cpu_has_native_bf16", "use_channels_last"]

logger = logging.getLogger(__name__)

INFERENCE_DTYPES = ("float32", "bfloat16")


@functools.cache
def cpu_has_native_bf16():
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16; Linux flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_inference_dtype(name):
    if name not in INFERENCE_DTYPES:
        raise ValueError(
            f"MODEL.DEFORMABLE_DETR.INFERENCE_DTYPE must be one of {INFERENCE_DTYPES}, got {name!r}"
        )
    return name


def inference_autocast(name, device_type):
    """
    Context of the eval-mode forward: nothing for "float32"; ``torch.autocast(device_type, bfloat16)`` for
    "bfloat16" (convolutions and linear layers in bfloat16; the deformable-attention kernels promote
    their inputs to float32, see ``ms_deform_attn``). Warns once when the CPU lacks bfloat16 instructions
    (oneDNN then emulates them, much slower than float32).
    """
    if name == "float32":
        return contextlib.nullcontext()
    if (
        device_type == "cpu"
        and not cpu_has_native_bf16()
        and not getattr(inference_autocast, "_warned", False)
    ):
        inference_autocast._warned = True
        logger.warning(
            "INFERENCE_DTYPE bfloat16 on a CPU without AVX512-BF16 / AMX: bfloat16 matrix products are "
            "emulated and far slower than float32 here (see docs/benchmarks.md)"
        )
    return torch.autocast(device_type, dtype=torch.bfloat16)


def use_channels_last(enabled, training, images):
    """
    Whether the eval-mode forward gives the backbone a channels-last (NHWC) batch
    (``MODEL.DEFORMABLE_DETR.INFERENCE_CHANNELS_LAST``): only on the CPU, where oneDNN's convolutions
    then run without layout reorders, and never while tracing (export keeps the plain layout). The
    values are the same up to float rounding; training and CUDA inference keep NCHW.
    """
    return (
        enabled
        and not training
        and images.device.type == "cpu"
        and images.dim() == 4
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
    )
