"""Datasets (synthetic shapes, user COCO folders) and the DETR dataset mapper."""
