"""ddetr_video: query-propagation multi-object tracking on Deformable DETR (Detectron2 project)."""

try:  # the model half needs detectron2; the data / metric modules work without it
    import detectron2  # noqa: F401
except ImportError:
    pass
else:
    # register QueryTracker, the tiny backbone, the "mot" evaluator and the "mot" dataset validator
    from . import engine, tiny_backbone, tracker_model, validation  # noqa: F401,E402
    from .config import add_tracker_config, get_tracker_cfg  # noqa: F401,E402
from . import datasets  # noqa: F401,E402  (registers synthetic_mot_*, mot17_*, mot20_*, dancetrack_* datasets)
