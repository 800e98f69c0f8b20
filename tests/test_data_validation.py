"""Pre-flight dataset validation (ddetr_d2.data.validation): one generated dataset per fault, several
faults reported together, the "drop" policy for invalid boxes, lazily generated and non-COCO datasets."""

import json
import math
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from ddetr_d2.config import build_cfg
from ddetr_d2.data import make_synthetic_coco, register_coco_folder
from ddetr_d2.data.validation import (
    BOX_TOLERANCE,
    DataProblem,
    DatasetValidationError,
    check_datasets,
    register_validator,
    validate_coco_json,
    validate_datasets,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_counter = iter(range(10**6))


def _cfg(train=(), test=(), num_classes=6, invalid_boxes="error"):
    return build_cfg(
        os.path.join(REPO, "configs", "tiny_test.yaml"),
        ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", str(num_classes), "DATASETS.TRAIN", str(tuple(train)),
         "DATASETS.TEST", str(tuple(test)), "DATASETS.INVALID_BOXES", invalid_boxes],
    )  # fmt: skip


def _dataset(tmp_path, mutate=None):
    """A 3-image synthetic COCO set (6 categories) after ``mutate(data, image_dir)``; returns
    (json path, image dir, data)."""
    j = make_synthetic_coco(str(tmp_path), "s", 3, seed=0, image_size=64)
    image_dir = os.path.join(str(tmp_path), "s", "images")
    data = json.load(open(j))
    assert len(data["annotations"]) >= 2
    if mutate:
        mutate(data, image_dir)
    with open(j, "w") as f:
        json.dump(data, f)  # NaN / Infinity are written as the json extensions Python reads back
    return j, image_dir, data


def _kinds(problems):
    return sorted(p.kind for p in problems if p.severity == "error")


def _set_box(box):
    def mutate(data, image_dir):
        data["annotations"][0]["bbox"] = box

    return mutate


def test_clean_dataset_has_no_problems(tmp_path):
    j, d, _ = _dataset(tmp_path)
    assert validate_coco_json(j, d, num_classes=6, is_train=True) == []


def test_missing_image(tmp_path):
    j, d, data = _dataset(
        tmp_path, lambda data, d: os.remove(os.path.join(d, data["images"][1]["file_name"]))
    )
    (p,) = validate_coco_json(j, d)
    assert p.kind == "missing image" and p.where == f"{j}: image id={data['images'][1]['id']}"
    assert p.message == os.path.join(d, data["images"][1]["file_name"])


def test_empty_image(tmp_path):
    j, d, data = _dataset(
        tmp_path, lambda data, d: open(os.path.join(d, data["images"][2]["file_name"]), "w")
    )
    assert _kinds(validate_coco_json(j, d)) == ["empty image"]


@pytest.mark.parametrize(
    "box,why",
    [
        ([47, 13, -20, 42], "width/height <= 0"),
        ([5, 5, 10, 0], "width/height <= 0"),
        ([5, 5, math.nan, 10], "NaN/inf"),
        ([5, math.inf, 10, 10], "NaN/inf"),
        ([5, 5, "10", 10], "non-numeric"),
        ([5, 5, 10], "not [x, y, w, h]"),
    ],
)
def test_invalid_box(tmp_path, box, why):
    j, d, data = _dataset(tmp_path, _set_box(box))
    (p,) = validate_coco_json(j, d)
    ann = data["annotations"][0]
    assert p.kind == "invalid box" and why in p.message
    assert p.where.startswith(f"{j}: annotation id={ann['id']} (image id={ann['image_id']} ")


def test_box_outside_the_image_beyond_the_tolerance(tmp_path):
    def mutate(data, image_dir):
        im = data["images"][0]
        w, h = im["width"], im["height"]
        for a in data["annotations"]:
            if a["image_id"] == im["id"]:
                a["bbox"] = [1, 1, 2, 2]
        data["annotations"][0].update(image_id=im["id"], bbox=[w - 10, 0, 10 + 2 * BOX_TOLERANCE, 5])
        data["annotations"][1].update(
            image_id=im["id"], bbox=[-BOX_TOLERANCE / 2, 0, 10, h + BOX_TOLERANCE / 2]
        )

    j, d, data = _dataset(tmp_path, mutate)
    (p,) = validate_coco_json(j, d)  # the second box is within the tolerance
    assert (
        p.kind == "invalid box"
        and "outside" in p.message
        and f"annotation id={data['annotations'][0]['id']}" in p.where
    )


def test_unknown_category_and_unknown_image(tmp_path):
    def mutate(data, image_dir):
        data["annotations"][0]["category_id"] = 99
        data["annotations"][1]["image_id"] = 1234

    j, d, _ = _dataset(tmp_path, mutate)
    problems = validate_coco_json(j, d)
    assert _kinds(problems) == ["unknown category", "unknown image"]
    assert "category_id=99 is not one of [1, 2, 3, 4, 5, 6]" in problems[0].message
    assert "image_id=1234" in problems[1].message


def test_unreadable_json_is_one_problem(tmp_path):
    j = tmp_path / "broken.json"
    j.write_text('{"images": [')
    (p,) = validate_coco_json(str(j), str(tmp_path))
    assert p.kind == "unreadable json" and p.where == str(j)
    (p,) = validate_coco_json(str(tmp_path / "absent.json"), str(tmp_path))
    assert p.kind == "missing file"


def test_training_set_without_annotations(tmp_path):
    j, d, _ = _dataset(tmp_path, lambda data, d: data.update(annotations=[]))
    assert _kinds(validate_coco_json(j, d, is_train=True)) == ["no annotations"]
    assert validate_coco_json(j, d, is_train=False) == []  # a test set may be empty


def test_num_classes_smaller_is_an_error_larger_a_warning(tmp_path):
    j, d, _ = _dataset(tmp_path)
    (p,) = validate_coco_json(j, d, num_classes=3)
    assert p.severity == "error" and "NUM_CLASSES=3" in p.message and "6 categories" in p.message
    (p,) = validate_coco_json(j, d, num_classes=91)
    assert p.severity == "warning" and "allowed" in p.message and "91-class" in p.message


def _register(name, j, d):
    name = f"{name}_{next(_counter)}"
    register_coco_folder(name, j, d)
    return name


def test_several_faults_are_reported_together(tmp_path):
    def mutate(data, image_dir):
        data["annotations"][0]["bbox"] = [47, 13, -20, 42]
        data["annotations"][1]["category_id"] = 42
        os.remove(os.path.join(image_dir, data["images"][0]["file_name"]))

    j, d, _ = _dataset(tmp_path, mutate)
    name = _register("several", j, d)
    with pytest.raises(DatasetValidationError) as e:
        check_datasets(_cfg(train=[name], num_classes=4))
    lines = str(e.value).splitlines()
    assert lines[0] == f"dataset {name}: 4 problem(s)"
    kinds = [next(k for k in ("missing image", "invalid box", "unknown category", "too few classes")
                  if f": {k}: " in line) for line in lines[1:5]]  # fmt: skip
    assert kinds == ["missing image", "invalid box", "unknown category", "too few classes"]
    assert lines[5] == "counts: invalid box 1, missing image 1, too few classes 1, unknown category 1"
    assert "DATASETS.INVALID_BOXES drop" in lines[6]
    assert len(e.value.problems) == 4


def test_problem_list_is_capped_with_counts(tmp_path):
    def mutate(data, image_dir):
        for a in data["annotations"]:
            a["bbox"] = [0, 0, -1, 1]

    j, d, data = _dataset(tmp_path, mutate)
    name = _register("capped", j, d)
    with pytest.raises(DatasetValidationError) as e:
        check_datasets(_cfg(train=[name]), limit=1)
    n = len(data["annotations"])
    lines = str(e.value).splitlines()
    assert lines[2] == f"... and {n - 1} more" and lines[3] == f"counts: invalid box {n}"


def test_drop_policy_removes_invalid_boxes_at_load(tmp_path, caplog):
    """INVALID_BOXES drop: warnings instead of an error, and the loader drops the box; it never
    reaches Detectron2's transforms, which would turn [47, 13, -20, 42] into a valid 20x42 box."""
    j, d, data = _dataset(tmp_path, _set_box([47, 13, -20, 42]))
    name = _register("drop", j, d)
    with pytest.raises(DatasetValidationError):
        check_datasets(_cfg(train=[name]))
    problems = check_datasets(_cfg(train=[name], invalid_boxes="drop"))
    assert [p.severity for p in problems] == ["warning"]
    dicts = DatasetCatalog.get(name)
    boxes = [a["bbox"] for r in dicts for a in r.get("annotations", [])]
    assert len(boxes) == len(data["annotations"]) - 1 and [47, 13, -20, 42] not in boxes
    assert "1 annotation(s) have zero area or lie outside their image" in caplog.text
    with pytest.raises(DatasetValidationError, match="'error' or 'drop'"):
        check_datasets(_cfg(train=[name], invalid_boxes="fix"))


def test_lazily_generated_dataset_is_generated_before_validation(tmp_path):
    name = f"lazy_{next(_counter)}"
    root = tmp_path / "lazy"
    json_file = root / "s" / "annotations.json"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(
        json_file=str(json_file), image_root=str(root / "s" / "images"), evaluator_type="coco",
        prepare=lambda: json_file.is_file() or make_synthetic_coco(str(root), "s", 2, seed=1, image_size=64),
    )  # fmt: skip
    assert not json_file.exists()
    assert validate_datasets(_cfg(), [name], is_train=True) == []
    assert json_file.is_file()


def test_other_formats_use_the_registered_validator_and_unknown_names_are_problems(tmp_path):
    name = f"custom_{next(_counter)}"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(evaluator_type="ddetr_test_format")
    seen = []

    def validator(dataset_name, cfg):
        seen.append(dataset_name)
        return [DataProblem(f"{dataset_name}.txt:3", "bad row", "7 columns, expected 9")]

    register_validator("ddetr_test_format", validator)
    problems = validate_datasets(_cfg(), [name, "no_such_dataset"])
    assert seen == [name]
    assert [p.kind for p in problems] == ["bad row", "unknown dataset"]
    assert "no_such_dataset" in problems[1].where


def test_loader_sees_a_json_changed_after_the_preflight_check(tmp_path):
    """The loader reuses the pre-flight check of a json only for the same file version."""
    j, d, data = _dataset(tmp_path)
    name = _register("changed", j, d)
    check_datasets(_cfg(train=[name]))
    data["annotations"][0]["category_id"] = 77
    with open(j, "w") as f:
        json.dump(data, f, indent=1)  # another size: another file version
    with pytest.raises(DatasetValidationError, match="category_id=77"):
        DatasetCatalog.get(name)


def _pop(section, field):
    return lambda data, image_dir: data[section][0].pop(field)


def _put(section, field, value):
    return lambda data, image_dir: data[section][0].update({field: value})


def _same_id(section):
    return lambda data, image_dir: data[section][1].update(id=data[section][0]["id"])


@pytest.mark.parametrize(
    "mutate,kind,where,text",
    [
        (_pop("images", "height"), "missing field", "images[0] (id=", "no 'height' field"),
        (_pop("images", "width"), "missing field", "images[0] (id=", "no 'width' field"),
        (_pop("images", "file_name"), "missing field", "images[0] (id=", "no 'file_name' field"),
        (_pop("images", "id"), "missing field", "images[0]", "no 'id' field"),
        (_pop("annotations", "id"), "missing field", "annotations[0]", "no 'id' field"),
        (_pop("annotations", "image_id"), "missing field", "annotations[0] (id=", "no 'image_id' field"),
        (_pop("annotations", "category_id"), "missing field", "annotations[0] (id=", "no 'category_id'"),
        (_pop("annotations", "bbox"), "missing field", "annotations[0] (id=", "no 'bbox' field"),
        (_pop("categories", "id"), "missing field", "categories[0]", "no 'id' field"),
        (_pop("categories", "name"), "missing field", "categories[0] (id=", "no 'name' field"),
        (_same_id("annotations"), "duplicate id", "annotations[1] (id=", "also the id of annotations[0]"),
        (_same_id("images"), "duplicate id", "images[1] (id=", "also the id of images[0]"),
        (_same_id("categories"), "duplicate id", "categories[1] (id=", "also the id of categories[0]"),
        (_put("annotations", "id", "a"), "bad field", "annotations[0]", "'id'='a' is not an integer"),
        (_put("images", "id", [1]), "bad field", "images[0]", "'id'=[1] is not an integer"),
        (_put("categories", "id", 1.5), "bad field", "categories[0]", "'id'=1.5 is not an integer"),
        (_put("annotations", "image_id", [1]), "bad field", "annotations[0] (id=", "'image_id'=[1] is not"),
        (_put("annotations", "category_id", "2"), "bad field", "annotations[0] (id=", "'category_id'='2'"),
        (_put("images", "height", 0), "bad field", "images[0] (id=", "'height'=0 is not a positive whole"),
        (_put("images", "width", "64"), "bad field", "images[0] (id=", "'width'='64' is not a positive"),
        (_put("images", "height", 64.5), "bad field", "images[0] (id=", "'height'=64.5 is not a positive"),
        (lambda data, d: data.update(images={}), "not COCO", "", "'images' must be an array of objects, got"),
        (lambda data, d: data["images"].append("x.png"), "not COCO", "images[3]", "images[3] is string"),
        (lambda data, d: data.update(annotations={}), "not COCO", "", "'annotations' must be an array"),
        (lambda data, d: data["annotations"].insert(0, 7), "not COCO", "annotations[0]", "is number"),
        (lambda data, d: data.update(categories=None), "not COCO", "", "'categories' must be an array"),
        (lambda data, d: data["categories"].append([]), "not COCO", "categories[6]", "is array"),
    ],
)  # fmt: skip
def test_malformed_entries_are_named_not_crashed_on(tmp_path, mutate, kind, where, text):
    """Fields Detectron2 / pycocotools read (KeyError, AssertionError, AttributeError there) are
    reported first, naming the file, the entry and the field, by the pre-flight check and the loader."""
    j, d, _ = _dataset(tmp_path, mutate)
    name = _register("malformed", j, d)
    for invalid_boxes in ("error", "drop"):
        with pytest.raises(DatasetValidationError) as e:
            check_datasets(_cfg(train=[name], invalid_boxes=invalid_boxes))
        first = e.value.problems[0]  # where: the file, or the file and the entry (index, id when valid)
        assert first.kind == kind and text in first.message
        assert first.where.startswith(f"{j}: {where}") if where else first.where == j
        assert str(e.value).splitlines()[1].startswith(f"{first.where}: {kind}: {first.message}")
    with pytest.raises(DatasetValidationError, match=f": {kind}: "):
        DatasetCatalog.get(name)


def test_missing_file_name_is_not_a_missing_image(tmp_path):
    j, d, _ = _dataset(tmp_path, _pop("images", "file_name"))
    assert _kinds(validate_coco_json(j, d)) == ["missing field"]


def test_whole_float_sizes_pass_and_load(tmp_path):
    """Some exporters write "height": 480.0; Detectron2 compares sizes with == (480.0 == 480)."""

    def floats(data, image_dir):
        for im in data["images"]:
            im["height"], im["width"] = float(im["height"]), float(im["width"])

    j, d, _ = _dataset(tmp_path, floats)
    assert validate_coco_json(j, d) == []
    name = _register("float_sizes", j, d)
    check_datasets(_cfg(train=[name]))
    assert all(float(r["height"]).is_integer() for r in DatasetCatalog.get(name))
