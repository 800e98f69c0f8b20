"""ddetr_video: query-propagation multi-object tracking on Deformable DETR (Detectron2 project)."""
from . import tracker_model  # noqa: F401,E402  (registers the QueryTracker meta-architecture)
from .config import add_tracker_config, get_tracker_cfg  # noqa: F401,E402
from . import tiny_backbone  # noqa: F401,E402  (registers build_tiny_conv_backbone)
from . import datasets  # noqa: F401,E402  (registers synthetic_mot_*, mot17_*, mot20_*, dancetrack_* datasets)
