"""Demo helpers: predictor + visualisation (``predictor``), sampling points (``sampling``), I/O (``io``).

``tools/demo.py`` and ``tools/visualize_sampling.py`` are thin wrappers around ``cli``.
"""

from .io import DemoError
from .sampling import (
    DetectionSampling,
    SamplingRecord,
    SamplingRecorder,
    draw_sampling_points,
    normalized_to_image_coords,
    points_inside,
)

__all__ = [
    "DemoError",
    "DetectionSampling",
    "SamplingRecord",
    "SamplingRecorder",
    "draw_sampling_points",
    "normalized_to_image_coords",
    "points_inside",
]
