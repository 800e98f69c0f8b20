"""``torch.compile`` of the encoder layers of an inference-only model
(``MODEL.DEFORMABLE_DETR.INFERENCE_COMPILE``).

The encoder runs over every pixel of every level (17,821 tokens at 800x1066): besides its matrix products,
its time goes to element-wise passes over (tokens x 256) and (tokens x 1024) tensors (residual adds,
LayerNorm, ReLU, the sampling-location arithmetic, bias copies), which TorchInductor fuses into fewer loops.
The deformable sampling itself stays the compiled C++/CUDA kernel (Dynamo breaks the graph around it).
Measured on a 2-core AVX2 CPU (docs/benchmarks.md): whole R-50 forward at 800x1066 -10 to -15 %, after a
first call of ~35-40 s spent compiling (again once for the first new image size, which is then compiled with
dynamic shapes).

Inference only: a model in training mode is refused (compiled layers would be compiled again for the backward,
and training outputs are not what was measured). Export (``tools/export_model.py``) never compiles: tracing
needs the plain modules.
"""

from torch import nn

__all__ = ["compile_encoder_layers"]


def compile_encoder_layers(model: nn.Module) -> int:
    """Compile each layer of ``model.transformer.encoder`` in place (``nn.Module.compile``, Inductor, default
    options). Returns the number of layers compiled. Raises ValueError for a model in training mode."""
    if model.training:
        raise ValueError("compile_encoder_layers is for inference-only models: call model.eval() first")
    layers = model.transformer.encoder.layers
    for layer in layers:
        layer.compile()
    return len(layers)
