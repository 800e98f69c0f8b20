"""ddetr_video: query-propagation multi-object tracking on Deformable DETR (Detectron2 project)."""

try:  # the model half needs detectron2; the data / metric modules work without it
    import detectron2  # noqa: F401
except ImportError:
    pass
else:
    from . import tiny_backbone, tracker_model  # noqa: F401,E402  (register QueryTracker + tiny backbone)
    from .config import add_tracker_config, get_tracker_cfg  # noqa: F401,E402
from . import datasets  # noqa: F401,E402  (registers synthetic_mot_*, mot17_*, mot20_*, dancetrack_* datasets)
