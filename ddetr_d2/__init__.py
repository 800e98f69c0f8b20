"""ddetr-d2: Deformable DETR as a Detectron2 project.

``ddetr_d2.ops`` needs torch only. Importing ``ddetr_d2`` with detectron2 installed also
registers the meta-architecture, the config function and the built-in datasets.
"""
__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ImportError:  # torch-only install: the ops still work
    pass
else:
    from . import data, modeling  # noqa: F401  (registration side effects)
    from .config import add_deformable_detr_config  # noqa: F401
