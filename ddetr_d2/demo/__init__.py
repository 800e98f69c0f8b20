"""Demo helpers: model + predictor + visualisation (``predictor``), sampling points (``sampling``), I/O
(``io``), command lines (``cli``).

``tools/demo.py`` and ``tools/visualize_sampling.py`` are thin wrappers around ``cli``. Tracking is not
here: the video add-on's ``ddetr_video.demo`` builds its demo from these pieces.
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
