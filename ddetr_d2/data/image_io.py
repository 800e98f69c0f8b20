"""The project's one image reader (training / evaluation mapper, demo, visualize_sampling).

:func:`read_image` is Detectron2's ``detection_utils.read_image`` (same EXIF orientation fix, same
``convert_PIL_to_numpy``), so 8-bit images read bit-identically, except that 16-bit integer images
(PIL modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` and ``I``, e.g. a 16-bit grayscale PNG) are first
scaled to 8 bits as ``round(value / 257)`` (0..65535 -> 0..255). Detectron2 converts them with
``Image.convert``, which clips every value above 255 to 255: an almost white image. A 16-bit RGB PNG
needs nothing: PIL already reduces it to 8-bit ``RGB``.
"""

import numpy as np
from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["read_image", "to_8bit", "SIXTEEN_BIT_MODES"]

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I" (32-bit int) read as 0..65535


def to_8bit(image):
    """
    ``image`` (a PIL image) with 16-bit integer modes scaled to an 8-bit ``L`` image
    (``round(v / 257)``); other modes are returned unchanged. ValueError for values outside 0..65535
    (e.g. a signed 32-bit image) or a float (``F``) image, which have no fixed range.
    """
    if image.mode == "F":
        raise ValueError("32-bit float (PIL mode F) images are not supported; convert it to 8 or 16 bits")
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"{image.mode} image with values in [{values.min()}, {values.max()}], outside 0..65535; "
            "only 8- and 16-bit images are supported"
        )
    # round(v / 257) without float error: v / 257 never ends in .5 for an integer v
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))  # mode L


def read_image(file_name, format=None):
    """
    Read an image into ``format`` (a PIL mode, ``"BGR"`` or ``"YUV-BT.601"``) like Detectron2's
    ``read_image`` (EXIF orientation applied), with 16-bit images scaled to 8 bits (:func:`to_8bit`).
    Raises what PIL raises for missing or undecodable files, ValueError for unsupported pixel types;
    callers add the file name.
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = _apply_exif_orientation(image)
        return convert_PIL_to_numpy(to_8bit(image), format)
