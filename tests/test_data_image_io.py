"""The shared image reader (ddetr_d2.data.image_io): 16-bit images scaled to 8 bits, 8-bit images read
exactly like Detectron2's read_image, used by the dataset mapper and the demo."""

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data.detection_utils import read_image as d2_read_image
from PIL import Image

from ddetr_d2.data import DetrDatasetMapper, add_dataset_mapper_config
from ddetr_d2.data.image_io import read_image, to_8bit
from ddetr_d2.demo.io import DemoError, read_image_bgr

H, W = 9, 13


def _raw16(rng):
    """(H, W) uint16 values over the whole range, with both ends and the rounding boundaries."""
    raw = rng.integers(0, 65536, size=(H, W), dtype=np.int64)
    raw.flat[:6] = [0, 65535, 128, 129, 257 * 100 + 128, 257 * 100 + 129]
    return raw.astype(np.uint16)


def _expected8(raw):
    """Reference: round(v / 257) in float64 on the raw PIL values."""
    return np.rint(raw.astype(np.float64) / 257.0).astype(np.uint8)


def _image16(raw, mode):
    if mode == "I":
        return Image.fromarray(raw.astype(np.int32))
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (raw.shape[1], raw.shape[0]), raw.astype(dtype).tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_16bit_modes_are_scaled_by_257(mode):
    raw = _raw16(np.random.default_rng(0))
    image = _image16(raw, mode)
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(image).astype(np.int64), raw)  # the test image holds raw
    out = to_8bit(image)
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), _expected8(raw))


@pytest.mark.parametrize(("mode", "ext"), [("I;16", "png"), ("I;16B", "tif"), ("I", "tif")])
def test_16bit_files_read_scaled_in_every_format(tmp_path, mode, ext):
    raw = _raw16(np.random.default_rng(1))
    path = str(tmp_path / f"img16.{ext}")
    _image16(raw, mode).save(path)
    with Image.open(path) as check:
        assert check.mode == mode
    expected = _expected8(raw)
    rgb = np.repeat(expected[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(read_image(path, format="BGR"), rgb)
    np.testing.assert_array_equal(read_image(path, format="RGB"), rgb)
    np.testing.assert_array_equal(read_image(path, format="L"), expected[:, :, None])
    demo = read_image_bgr(path)  # the demo's and visualize_sampling's reader
    assert demo.dtype == np.uint8 and demo.flags.c_contiguous
    np.testing.assert_array_equal(demo, rgb)


def _eight_bit_files(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    files = []
    for mode, ext in [
        ("RGB", "jpg"),
        ("RGB", "png"),
        ("L", "png"),
        ("P", "png"),
        ("RGBA", "png"),
        ("LA", "png"),
        ("1", "png"),
        ("CMYK", "jpg"),
    ]:
        path = tmp_path / f"{mode}.{ext}"
        image = Image.fromarray(rgb)
        image = image.convert("RGBA") if mode == "LA" else image
        image.convert(mode).save(path)
        files.append(path)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    path = tmp_path / "exif_rotated.jpg"
    Image.fromarray(rgb).save(path, exif=exif)
    files.append(path)
    return files


def test_8bit_images_read_exactly_like_detectron2(tmp_path):
    for path in _eight_bit_files(tmp_path):
        for fmt in ("BGR", "RGB", "L", "YUV-BT.601", None):
            ours, theirs = read_image(str(path), format=fmt), d2_read_image(str(path), format=fmt)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (path, fmt)
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{path} {fmt}")
    rotated = read_image(str(tmp_path / "exif_rotated.jpg"), format="BGR")
    assert rotated.shape == (W, H, 3)  # EXIF orientation applied


def test_unsupported_pixel_types_name_the_file(tmp_path):
    signed = tmp_path / "signed32.tif"
    Image.fromarray(np.full((H, W), -5, np.int32)).save(signed)
    floats = tmp_path / "float32.tif"
    Image.fromarray(np.zeros((H, W), np.float32)).save(floats)
    with Image.open(floats) as check:
        assert check.mode == "F"
    for path in (signed, floats):
        with pytest.raises(DemoError, match=path.name):
            read_image_bgr(str(path))
        with pytest.raises(ValueError):
            read_image(str(path), format="BGR")


def test_dataset_mapper_reads_16bit_images_scaled(tmp_path):
    raw = _raw16(np.random.default_rng(3))
    path = tmp_path / "gray16.png"
    _image16(raw, "I;16").save(path)
    cfg = get_cfg()
    add_dataset_mapper_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    mapper = DetrDatasetMapper(cfg, is_train=False, augmentations=[])  # no resize: the pixels as read
    out = mapper({"file_name": str(path), "height": H, "width": W, "image_id": 0})
    expected = np.repeat(_expected8(raw)[None], 3, axis=0)
    np.testing.assert_array_equal(out["image"].numpy(), expected)
    signed = tmp_path / "signed32.tif"
    Image.fromarray(np.full((H, W), -5, np.int32)).save(signed)
    with pytest.raises(OSError, match="signed32.tif"):
        mapper({"file_name": str(signed), "height": H, "width": W, "image_id": 1})
