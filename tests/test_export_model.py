"""Export of the whole detector (tiny configs, random weights): the ONNX graph run by onnxruntime gives
the PyTorch model's detections (classes equal, scores within 1e-4, boxes within 1e-2 px) for each variant,
both deformable-attention formulations and two input sizes, on fresh images (not the traced one); the
TorchScript export too; the runtime predictor keeps DefaultPredictor's contract (on one of those exports)
and refuses exports it cannot run (missing / corrupt files, another number of classes); each formulation
is written with the opset it needs; a failed export leaves the earlier one in its folder untouched.
The command line (tools/export_model.py) is run by tests/test_export_demo.py, whose demo runs its export."""

import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from model_testing import VARIANTS, tiny_cfg

from ddetr_d2.export import export_detector, read_export_meta
from ddetr_d2.export.exporter import _detect

onnx = pytest.importorskip("onnx", reason="onnx is a test extra (requirements-test.txt)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra (requirements-test.txt)")

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::UserWarning")

SIZES = [(64, 96), (96, 64)]


@pytest.fixture(scope="module")
def models():
    """One tiny model per variant, weights moved off the symmetric init so every sample matters."""
    out = {}
    with torch.no_grad():
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            torch.manual_seed(i)
            model = build_model(tiny_cfg(**overrides)).eval()
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
            out[name] = model
    return out


@pytest.fixture(scope="module")
def onnx_export(models, tmp_path_factory):
    """``onnx_export(variant, msda, size)``: path of the ONNX export of ``models[variant]``, made once per
    module (the predictor test reuses one of the exports the round-trip test checks)."""
    root, paths = tmp_path_factory.mktemp("exports"), {}

    def get(variant, msda, size):
        key = (variant, msda, tuple(size))
        if key not in paths:
            folder = root / f"{variant}-{msda}-{size[0]}x{size[1]}"
            paths[key] = export_detector(models[variant], str(folder), "onnx", msda, input_size=size)
        return paths[key]

    return get


def assert_same_detections(got, want, score_tol=1e-4, box_tol=1e-2):
    """
    ``got`` / ``want``: dicts of arrays pred_boxes (K, 4), scores (K,), pred_classes (K,), query_indices (K,).
    Detections are matched by (query, class); a pair found in only one list must sit at the score cut-off.
    """

    def by_key(d):
        return {
            (int(q), int(c)): (float(s), np.asarray(b, dtype=np.float64))
            for q, c, s, b in zip(d["query_indices"], d["pred_classes"], d["scores"], d["pred_boxes"])
        }

    g, w = by_key(got), by_key(want)
    assert len(g) == len(got["scores"]) and len(w) == len(want["scores"])
    cut = min(np.min(got["scores"]), np.min(want["scores"]))
    for key in set(g) ^ set(w):
        score = (g.get(key) or w.get(key))[0]
        assert score - cut <= score_tol, f"detection {key} (score {score}) is only in one output"
    common = set(g) & set(w)
    assert len(common) >= len(w) - 2
    for key in common:
        assert abs(g[key][0] - w[key][0]) <= score_tol, (key, g[key][0], w[key][0])
        assert np.abs(g[key][1] - w[key][1]).max() <= box_tol, (key, g[key][1], w[key][1])


def torch_detections(model, image):
    with torch.no_grad():
        inst = _detect(model, image)
    return {
        "pred_boxes": inst.pred_boxes.tensor.numpy(),
        "scores": inst.scores.numpy(),
        "pred_classes": inst.pred_classes.numpy(),
        "query_indices": inst.query_indices.numpy(),
    }


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("msda", ["grid_sample", "gather"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnx_export_matches_pytorch(models, onnx_export, variant, msda, size):
    model = models[variant]
    path = onnx_export(variant, msda, size)
    meta = read_export_meta(path)
    assert meta["input_size"] == list(size) and meta["msda"] == msda
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert ("GridSample" in ops) == (msda == "grid_sample"), sorted(ops)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(hash((variant, msda, size)) % 1000)
    image = torch.rand((3, *size), generator=g) * 255  # a fresh image, not the one traced with
    outputs = dict(zip(meta["output_names"], session.run(None, {"image": image.numpy()})))
    assert tuple(outputs["image_size"]) == size
    assert_same_detections(outputs, torch_detections(model, image))


def test_torchscript_export_matches_pytorch(models, tmp_path):
    model = models["two_stage"]
    path = export_detector(model, str(tmp_path), "torchscript", "gather", input_size=SIZES[0])
    traced = torch.jit.load(path)
    names = read_export_meta(path)["output_names"]
    image = torch.rand((3, *SIZES[0]), generator=torch.Generator().manual_seed(5)) * 255
    with torch.no_grad():
        outputs = {k: v.numpy() for k, v in zip(names, traced(image))}
    assert_same_detections(outputs, torch_detections(model, image))


def test_onnx_predictor_keeps_default_predictor_contract(models, onnx_export):
    """BGR image of another size than the export -> Instances in original coordinates, equal to the
    PyTorch predictor's (the export size is the predictor's resize of this image)."""
    from ddetr_d2.demo.predictor import ImagePredictor
    from ddetr_d2.export.exporter import default_export_size
    from ddetr_d2.export.onnx_predictor import ONNXPredictor

    cfg = tiny_cfg(**VARIANTS["refine"])
    # the test-time resize takes this 120x180 image to 64x96, a size the round-trip test exports
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = SIZES[0]
    model = models["refine"]
    bgr = np.random.default_rng(0).integers(0, 256, size=(120, 180, 3), dtype=np.uint8)
    size = default_export_size(cfg, bgr.shape[:2])
    assert size == SIZES[0]
    path = onnx_export("refine", "gather", size)
    got = ONNXPredictor(cfg, path)(bgr)["instances"]
    want = ImagePredictor(cfg, model)(bgr)["instances"]
    assert got.image_size == want.image_size == (120, 180)

    def fields(inst):
        return {
            "pred_boxes": inst.pred_boxes.tensor.numpy(),
            "scores": inst.scores.numpy(),
            "pred_classes": inst.pred_classes.numpy(),
            "query_indices": inst.query_indices.numpy(),
        }

    assert_same_detections(fields(got), fields(want))


def test_export_meta_records_classes_and_the_opset_each_formulation_needs(models, onnx_export):
    for msda, opset in (("grid_sample", 16), ("gather", 13)):
        path = onnx_export("plain", msda, SIZES[0])
        meta = read_export_meta(path)
        assert meta["num_classes"] == models["plain"].class_embed[0].out_features
        assert meta["opset"] == opset
        assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == opset


def test_a_failed_export_leaves_the_earlier_one_as_it_was(models, tmp_path, monkeypatch):
    path = export_detector(models["plain"], str(tmp_path), "onnx", "gather", input_size=SIZES[0])
    before = {f: open(tmp_path / f, "rb").read() for f in os.listdir(tmp_path)}

    def half_written(model, args, f, **kwargs):
        f.write(b"\x08partial")  # into the file object the exporter is given
        raise RuntimeError("exporter died")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    with pytest.raises(RuntimeError, match="exporter died"):
        export_detector(models["plain"], str(tmp_path), "onnx", "gather", input_size=SIZES[1])
    assert {f: open(tmp_path / f, "rb").read() for f in os.listdir(tmp_path)} == before
    assert read_export_meta(path)["input_size"] == list(SIZES[0])


def test_onnx_predictor_refuses_what_it_cannot_run(models, onnx_export, tmp_path):
    """A folder resolves to its model file; a missing or corrupt file, a folder without one, and a config
    with another number of classes are one-line ExportErrors naming the problem."""
    from ddetr_d2.export import ExportError
    from ddetr_d2.export.onnx_predictor import ONNXPredictor

    cfg = tiny_cfg(**VARIANTS["plain"])
    path = onnx_export("plain", "gather", SIZES[0])
    folder = os.path.dirname(path)
    bgr = np.zeros((*SIZES[0], 3), dtype=np.uint8)
    from_folder = ONNXPredictor(cfg, folder)(bgr)["instances"]
    from_file = ONNXPredictor(cfg, path)(bgr)["instances"]
    assert torch.equal(from_folder.scores, from_file.scores)

    other = cfg.clone()
    other.MODEL.DEFORMABLE_DETR.NUM_CLASSES += 3
    with pytest.raises(ExportError, match="exported with .* classes.*NUM_CLASSES"):
        ONNXPredictor(other, path)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "export_meta.json").write_text(open(os.path.join(folder, "export_meta.json")).read())
    with pytest.raises(ExportError, match="not found"):
        ONNXPredictor(cfg, str(broken))  # the folder has the meta only
    (broken / "model.onnx").write_bytes(open(path, "rb").read()[:5000])  # truncated
    with pytest.raises(ExportError, match="onnxruntime cannot load"):
        ONNXPredictor(cfg, str(broken / "model.onnx"))
    (broken / "other.onnx").write_bytes(open(path, "rb").read())
    with pytest.raises(ExportError, match="describes 'model.onnx'"):
        ONNXPredictor(cfg, str(broken / "other.onnx"))
