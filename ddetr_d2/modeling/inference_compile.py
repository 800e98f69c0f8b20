"""``torch.compile`` of an inference-only model's backbone, encoder layers and decoder layers
(``MODEL.DEFORMABLE_DETR.INFERENCE_COMPILE``).

Besides its matrix products and convolutions, a CPU forward spends its time in element-wise passes: over
(tokens x 256) and (tokens x 1024) tensors in the encoder (17,821 tokens at 800x1066: residual adds,
LayerNorm, ReLU, the sampling-location arithmetic, bias copies), after each convolution in the backbone (ReLU,
residual adds), and in many small ops per decoder layer. TorchInductor fuses them into fewer loops. The
deformable sampling itself stays the compiled C++/CUDA kernel (Dynamo breaks the graph around it).
Measured on a 2-core AVX2 CPU (docs/benchmarks.md; A/B in one process), R-50 forward at 800x1066: with one
thread -6 % with the encoder layers compiled, -22 % with the backbone and decoder layers too; with two threads
-10 to -15 % either way (within noise of each other). The first call spends ~15-70 s compiling (again once for
the first new image size, which is then compiled with dynamic shapes).

With ``MODEL.DEFORMABLE_DETR.INFERENCE_COMPILE_FREEZING`` (default) Inductor also *freezes* the weights:
under ``torch.no_grad`` (the predictors' forward) parameters and buffers become constants of the compiled
graph, so weight-only arithmetic is folded and the weights of matrix products and convolutions are packed
once, in oneDNN's layout, instead of at every call. On the 2 cores of an AMX Xeon, bfloat16, R-50 at
800x1066: 1.65-1.71 s without, 1.08-1.25 s with it (docs/benchmarks.md). The weights are read at the first
call: load them before it and do not change them afterwards (a model from ``build_demo_model`` is built so).
Dynamo decides whether parameters are frozen from the *global* ``torch._inductor.config.freezing`` while it
traces (torch >= 2.5 lifts module parameters to graph inputs otherwise, and the compile option alone then
freezes nothing: measured 1.65 s instead of 1.08 s on torch 2.11), so each compiled module is called with that
flag set for the duration of the call (and restored after it): other code compiled in the process is not
affected.

Inference only: a model in training mode is refused (compiled modules would be compiled again for the
backward, and training outputs are not what was measured). Export (``tools/export_model.py``) never compiles:
tracing needs the plain modules.
"""

import functools

from torch import nn

__all__ = ["compile_for_inference", "inference_compiled_modules"]


def inference_compiled_modules(model: nn.Module):
    """The modules :func:`compile_for_inference` compiles, in order: the backbone, each encoder layer, each
    decoder layer."""
    transformer = model.transformer
    return [model.backbone, *transformer.encoder.layers, *transformer.decoder.layers]


def compile_for_inference(model: nn.Module, freezing: bool = True) -> int:
    """Compile the backbone and each encoder / decoder layer of ``model`` in place (``nn.Module.compile``,
    Inductor; compiled at the first call; ``freezing``: Inductor's ``freezing`` option, see above). Returns
    the number of modules compiled. Raises ValueError for a model in training mode."""
    if model.training:
        raise ValueError("compile_for_inference is for inference-only models: call model.eval() first")
    modules = inference_compiled_modules(model)
    for module in modules:
        module.compile(options={"freezing": bool(freezing)})
        if freezing:
            module._compiled_call_impl = _called_with_freezing(module._compiled_call_impl)
    return len(modules)


def _called_with_freezing(compiled_call):
    """``compiled_call`` run with the global ``inductor_config.freezing`` on, which Dynamo reads while it
    traces (the per-compile option reaches Inductor only)."""

    import torch._inductor.config as inductor_config  # only where compiling is asked for

    @functools.wraps(compiled_call)
    def call(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled_call(*args, **kwargs)

    return call
