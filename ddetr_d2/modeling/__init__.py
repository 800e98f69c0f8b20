"""Deformable DETR model components (registered in META_ARCH_REGISTRY on import)."""
