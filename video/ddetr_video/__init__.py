"""ddetr_video: query-propagation multi-object tracking on Deformable DETR (Detectron2 project)."""
