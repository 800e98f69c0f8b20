#!/usr/bin/env python
"""
End-to-end CPU inference of Deformable DETR (plain, box refinement, two-stage; R-50), side by side in one
run, on the same random weights:

  * ``hf``: Hugging Face ``DeformableDetrForObjectDetection`` (timm R-50, ``disable_custom_kernels=True``),
    its image processor's normalisation and ``post_process_object_detection`` (top 100), float32;
  * ``ours``: ``ImagePredictor`` on our model with the HF weights converted by
    ``ddetr_d2.conversion.convert_hf_state_dict``, float32;
  * ``ours_bf16``: the same with ``MODEL.DEFORMABLE_DETR.INFERENCE_DTYPE bfloat16``;
  * ``ours_compile``: ``ours`` with ``MODEL.DEFORMABLE_DETR.INFERENCE_COMPILE True`` (backbone and encoder /
    decoder layers compiled by ``torch.compile``; the compilation happens in the untimed warm-up run);
  * ``ours_bf16_compile``: both settings together (Inductor then fuses the bfloat16 <-> float32 casts that
    autocast puts around the dense layers into the neighbouring element-wise loops);
  * ``ort_grid_sample`` / ``ort_gather``: the model exported by ``ddetr_d2.export`` and run by
    ``ddetr_d2.export.onnx_predictor.ONNXPredictor`` (onnxruntime CPU), each MSDA formulation.

Before timing, one subprocess checks that ours and HF give the same top-100 detections (scores within
1e-4, same (query, class) pairs). Every (variant, size, implementation) runs in its own subprocess: peak
memory is its ``ru_maxrss``. Times: median of ``--repeats`` runs after one warm-up, ``--threads`` threads
(torch intra-op and onnxruntime intra-op). Our rows also give a per-stage breakdown (forward hooks):
preprocess, backbone, input projection, encoder, decoder, post-process (the rest: position embeddings,
flattening, query preparation). HF rows give the same stages from its modules.

The input is a random image already at the measured size (the resize is then a no-op for every
implementation, so all of them see the same pixels).

Usage: python tools/benchmark_inference.py [--sizes 800x1066 160x213] [--variants plain refine two_stage]
       [--impls hf ours ours_bf16 ours_compile ours_bf16_compile ort_grid_sample ort_gather]
       [--repeats 3] [--threads 2] [--pin-cpus 0,1] [--json out.json] [--opts KEY VALUE ...]
       [--hf-retain-freed-memory]

Our rows use the config's inference defaults (e.g. ``INFERENCE_RETAIN_FREED_MEMORY`` True: malloc keeps freed
memory, ``ddetr_d2/allocator.py``); ``--opts`` overrides them for an A/B.
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"plain": (False, False), "refine": (True, False), "two_stage": (True, True)}
IMPLS = ("hf", "ours", "ours_bf16", "ours_compile", "ours_bf16_compile", "ort_grid_sample", "ort_gather")
BF16_IMPLS = ("ours_bf16", "ours_bf16_compile")  # INFERENCE_DTYPE bfloat16
COMPILE_IMPLS = ("ours_compile", "ours_bf16_compile")  # INFERENCE_COMPILE True
STAGES = ("preprocess", "backbone", "input_proj", "encoder", "decoder", "postprocess", "other")
TOP_K = 100


# ----------------------------------------------------------------------------------------------- models
def hf_model(variant, seed=0):
    import torch
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    refine, two_stage = VARIANTS[variant]
    config = DeformableDetrConfig(
        use_timm_backbone=True,
        backbone="resnet50",
        use_pretrained_backbone=False,
        num_labels=80,
        with_box_refine=refine,
        two_stage=two_stage,
        disable_custom_kernels=True,
    )
    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # off the symmetric / zero inits, so every weight matters and scores spread
        for name, p in model.named_parameters():
            if "backbone" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def our_cfg(variant, weights, size, dtype="float32", compile_encoder=False, opts=()):
    """Our config of ``variant`` (then ``opts``); the test-time resize keeps a ``size`` image as it is."""
    from ddetr_d2.config import build_cfg

    refine, two_stage = VARIANTS[variant]
    h, w = (int(v) for v in size.split("x"))
    return build_cfg(
        os.path.join(REPO, "configs", "ddetr_r50.yaml"),
        [
            "MODEL.WEIGHTS",
            weights,
            "MODEL.DEVICE",
            "cpu",
            "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE",
            refine,
            "MODEL.DEFORMABLE_DETR.TWO_STAGE",
            two_stage,
            "MODEL.DEFORMABLE_DETR.INFERENCE_DTYPE",
            dtype,
            "MODEL.DEFORMABLE_DETR.INFERENCE_COMPILE",
            compile_encoder,
            "INPUT.MIN_SIZE_TEST",
            min(h, w),
            "INPUT.MAX_SIZE_TEST",
            max(h, w),
            *opts,
        ],
    )


def our_model(cfg):
    from ddetr_d2.demo.predictor import build_demo_model

    return build_demo_model(cfg)


def prepare_weights(variant, folder):
    """HF random weights -> ours (ddetr_d2.conversion); saved as .pth for the workers."""
    import torch

    from ddetr_d2.conversion import convert_hf_state_dict

    hf_path = os.path.join(folder, f"hf_{variant}.pth")
    ours_path = os.path.join(folder, f"ours_{variant}.pth")
    if not os.path.isfile(ours_path):
        hf = hf_model(variant)
        torch.save(hf.state_dict(), hf_path)
        torch.save({"model": convert_hf_state_dict(hf.state_dict())}, ours_path)
    return hf_path, ours_path


# ----------------------------------------------------------------------------------------------- timing
class StageTimer:
    """Wall time spent in modules (forward hooks), summed per stage name."""

    def __init__(self):
        self.totals, self._start, self.handles = {}, {}, []
        self.last_end = None

    def add(self, stage, modules):
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(lambda mod, inp, s=stage: self._begin(s, mod)))
            self.handles.append(m.register_forward_hook(lambda mod, inp, out, s=stage: self._end(s, mod)))

    def _begin(self, stage, mod):
        self._start[id(mod)] = time.perf_counter()

    def _end(self, stage, mod):
        now = time.perf_counter()
        self.totals[stage] = self.totals.get(stage, 0.0) + now - self._start.pop(id(mod))
        if stage == "decoder":
            self.last_end = now

    def reset(self):
        self.totals, self.last_end = {}, None


def run_ours(args, bgr):
    import torch

    from ddetr_d2.demo.predictor import ImagePredictor

    cfg = our_cfg(
        args.variant,
        args.weights,
        args.size,
        "bfloat16" if args.impl in BF16_IMPLS else "float32",
        compile_encoder=args.impl in COMPILE_IMPLS,
        opts=args.opts,
    )
    model = our_model(cfg)
    predictor = ImagePredictor(cfg, model)
    timer = StageTimer()
    timer.add("backbone", [model.backbone])
    timer.add("input_proj", list(model.input_proj))
    timer.add("encoder", [model.transformer.encoder])
    timer.add("decoder", [model.transformer.decoder])

    def once():
        timer.reset()
        t0 = time.perf_counter()
        inputs = predictor.preprocess(bgr)
        with torch.no_grad():
            t1 = time.perf_counter()
            images = model.preprocess_image([inputs])
            t2 = time.perf_counter()
            # the rest of model.forward on the ImageList (as DeformableDETR.forward does)
            from detectron2.modeling import detector_postprocess

            from ddetr_d2.modeling.inference_precision import inference_autocast

            with inference_autocast(model.inference_dtype, "cpu"):
                out = model.forward_outputs(images)
            res = model.inference(out["pred_logits"].float(), out["pred_boxes"].float(), images.image_sizes)[
                0
            ]
            res = detector_postprocess(res, inputs["height"], inputs["width"])
        t3 = time.perf_counter()
        stages = dict(timer.totals)
        stages["preprocess"] = (t1 - t0) + (t2 - t1)
        stages["postprocess"] = t3 - timer.last_end
        return t3 - t0, stages, res

    return once


def run_hf(args, bgr):
    import numpy as np
    import torch
    from transformers import DeformableDetrImageProcessor

    if args.hf_retain_freed_memory:
        from ddetr_d2.allocator import retain_freed_memory

        retain_freed_memory()
    model = hf_model(args.variant)
    model.load_state_dict(torch.load(args.hf_weights))
    processor = DeformableDetrImageProcessor(do_resize=False)
    timer = StageTimer()
    timer.add("backbone", [model.model.backbone])
    timer.add("input_proj", list(model.model.input_proj))
    timer.add("encoder", [model.model.encoder])
    timer.add("decoder", [model.model.decoder])
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    h, w = bgr.shape[:2]

    def once():
        timer.reset()
        t0 = time.perf_counter()
        inputs = processor(images=rgb, return_tensors="pt")
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs)
        res = processor.post_process_object_detection(out, threshold=0.0, target_sizes=[(h, w)], top_k=TOP_K)[
            0
        ]
        t2 = time.perf_counter()
        stages = dict(timer.totals)
        stages["preprocess"] = t1 - t0
        stages["postprocess"] = t2 - timer.last_end
        return t2 - t0, stages, res

    return once


def run_ort(args, bgr):
    import torch

    from ddetr_d2.export import export_detector
    from ddetr_d2.export.onnx_predictor import ONNXPredictor

    cfg = our_cfg(args.variant, args.weights, args.size)
    folder = os.path.join(args.workdir, f"onnx_{args.variant}_{args.impl}_{args.size}")
    path = os.path.join(folder, "model.onnx")
    if not os.path.isfile(path):
        model = our_model(cfg)
        image = torch.as_tensor(bgr[:, :, ::-1].astype("float32").transpose(2, 0, 1).copy())
        with torch.no_grad():
            export_detector(model, folder, "onnx", args.impl[len("ort_") :], image=image)
        del model
    predictor = ONNXPredictor(cfg, path, num_threads=args.threads)

    def once():
        t0 = time.perf_counter()
        res = predictor(bgr)
        return time.perf_counter() - t0, {}, res["instances"]

    return once


def worker(args):
    """One implementation, one variant, one size: timings + ru_maxrss as one JSON line on stdout."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    bgr = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    runners = {"hf": run_hf, **{impl: run_ours for impl in IMPLS if impl.startswith("ours")}}
    once = runners.get(args.impl, run_ort)(args, bgr)
    once()  # warm-up
    if args.pin_cpus:  # the build and compilation above used every core; the timed runs use these
        from ddetr_d2._threads import pin_all_threads

        pin_all_threads(args.pin_cpus)
    runs = [once() for _ in range(args.repeats)]
    times = [r[0] for r in runs]
    stages = {
        s: statistics.median(r[1].get(s, 0.0) for r in runs) for s in STAGES if any(s in r[1] for r in runs)
    }
    if stages:
        stages["other"] = max(0.0, statistics.median(times) - sum(stages.values()))
    result = {
        "impl": args.impl,
        "variant": args.variant,
        "size": args.size,
        "threads": args.threads,
        "pinned_cpus": args.pin_cpus,
        "median_s": statistics.median(times),
        "times_s": times,
        "stages_s": stages,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(result), flush=True)


def parity(args):
    """Ours vs HF on the same weights and image: same top-100 (query, class) pairs, scores within 1e-4."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    bgr = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    hf = hf_model(args.variant)
    hf.load_state_dict(torch.load(args.hf_weights))
    model = our_model(our_cfg(args.variant, args.weights, args.size))
    from ddetr_d2.demo.predictor import ImagePredictor

    x = ImagePredictor(our_cfg(args.variant, args.weights, args.size), model).preprocess(bgr)
    with torch.no_grad():
        images = model.preprocess_image([x])
        ours = model.forward_outputs(images)
        ref = hf(pixel_values=images.tensor)
    p_ours = ours["pred_logits"].sigmoid().flatten(1)
    p_hf = ref.logits.sigmoid().flatten(1)
    s_ours, i_ours = p_ours.topk(TOP_K)
    s_hf, i_hf = p_hf.topk(TOP_K)
    score_diff = (s_ours - s_hf).abs().max().item()
    same_pairs = len(set(i_ours[0].tolist()) & set(i_hf[0].tolist()))
    box_diff = (ours["pred_boxes"] - ref.pred_boxes).abs().max().item()
    ok = score_diff <= 1e-4 and same_pairs >= TOP_K - 2
    print(
        "RESULT "
        + json.dumps(
            {
                "parity": ok,
                "variant": args.variant,
                "size": args.size,
                "top100_score_diff": score_diff,
                "same_pairs": same_pairs,
                "max_box_diff": box_diff,
            }
        ),
        flush=True,
    )


def _cpu_list(text):
    from ddetr_d2._threads import parse_cpu_list, require_usable

    try:
        return require_usable(parse_cpu_list(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def spawn(extra, args, timeout=3600):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--workdir",
        args.workdir,
    ]
    cmd += ["--hf-retain-freed-memory"] if args.hf_retain_freed_memory else []
    cmd += ["--pin-cpus", ",".join(map(str, args.pin_cpus))] if args.pin_cpus else []
    cmd += ["--opts", *args.opts] if args.opts else []
    cmd += extra
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (res.stderr or res.stdout)[-1500:]}


# ----------------------------------------------------------------------------------------------- report
def table(results, sizes, variants):
    lines = []
    for size in sizes:
        lines.append(f"\n### {size}\n")
        lines.append(
            "| variant | impl | median s | speed-up vs HF | peak RSS MB | preprocess | backbone | input proj "
            "| encoder | decoder | post-process | other |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for v in variants:
            rows = [r for r in results if r.get("size") == size and r.get("variant") == v and "median_s" in r]
            hf = next((r["median_s"] for r in rows if r["impl"] == "hf"), None)
            for r in rows:
                st = r["stages_s"]
                cells = [f"{st[s]:.3f}" if s in st else "-" for s in STAGES]
                speed = f"{hf / r['median_s']:.2f}x" if hf else "-"
                lines.append(
                    f"| {v} | {r['impl']} | {r['median_s']:.3f} | {speed} | {r['peak_rss_mb']:.0f} | "
                    + " | ".join(cells)
                    + " |"
                )
    return "\n".join(lines)


MIN_SIDE = 64  # the coarsest level has stride 64


def size_arg(text):
    """argparse type of ``--size(s)``: ``HxW``, each side >= MIN_SIDE; returns the text."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 800x1066, got {text!r}") from None
    if min(h, w) < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"each side must be >= {MIN_SIDE}, got {text!r}")
    return f"{h}x{w}"


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", type=size_arg, default=["800x1066", "160x213"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--workdir", default=None, help="folder for weights and exports (default: a temp dir)"
    )
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument(
        "--bf16-max-pixels",
        type=int,
        default=None,
        help="skip ours_bf16 above this many pixels (default: no limit on a CPU with "
        "AVX512-BF16/AMX, 40000 otherwise: emulated bfloat16 is ~20x slower than float32)",
    )
    parser.add_argument(
        "--opts",
        nargs="+",
        default=[],
        help="config KEY VALUE pairs for our rows (e.g. MODEL.DEFORMABLE_DETR.INFERENCE_RETAIN_FREED_MEMORY "
        "False)",
    )
    parser.add_argument(
        "--hf-retain-freed-memory",
        action="store_true",
        help="HF rows with glibc malloc keeping freed memory too (what INFERENCE_RETAIN_FREED_MEMORY does "
        "for ours; off: HF as users run it)",
    )
    parser.add_argument(
        "--pin-cpus",
        type=_cpu_list,
        default=None,
        help="e.g. 0,1: each implementation builds, compiles and warms up on every core, then its timed "
        "runs are pinned to these CPUs (all threads). Unlike `taskset -c 0,1 python ...`, Inductor's "
        "compilation is not confined to the pinned cores (a compiled row took 2-4 minutes pinned to 2 "
        "cores of the lent machine's host)",
    )
    # worker mode (internal)
    parser.add_argument("--worker", choices=IMPLS + ("parity",), help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--hf-weights", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.impl = args.worker
        return parity(args) if args.worker == "parity" else worker(args)

    from ddetr_d2.modeling.inference_precision import cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16()
    bf16_max = args.bf16_max_pixels if args.bf16_max_pixels is not None else (None if native_bf16 else 40000)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="ddetr_bench_")
    os.makedirs(args.workdir, exist_ok=True)
    print(
        f"threads {args.threads}, repeats {args.repeats} (+1 warm-up), CPU native bf16: {native_bf16}, "
        f"workdir {args.workdir}, opts {args.opts}, "
        f"HF malloc keeps freed memory: {args.hf_retain_freed_memory}, "
        f"timed runs pinned to CPUs: {args.pin_cpus or 'no'}",
        flush=True,
    )
    results = []
    for variant in args.variants:
        hf_path, ours_path = prepare_weights(variant, args.workdir)
        for size in args.sizes:
            common = ["--variant", variant, "--size", size, "--weights", ours_path, "--hf-weights", hf_path]
            check = spawn(["--worker", "parity"] + common, args)
            print(json.dumps(check), flush=True)
            results.append(check)
            for impl in args.impls:
                h, w = (int(v) for v in size.split("x"))
                if impl in BF16_IMPLS and bf16_max is not None and h * w > bf16_max:
                    print(f"skip {impl} {variant} {size}: no native bf16 on this CPU", flush=True)
                    continue
                r = spawn(["--worker", impl] + common, args)
                r.setdefault("impl", impl)
                r.setdefault("variant", variant)
                r.setdefault("size", size)
                print(json.dumps(r), flush=True)
                results.append(r)
    print(table(results, args.sizes, args.variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "threads": args.threads,
                    "repeats": args.repeats,
                    "native_bf16": native_bf16,
                    "opts": args.opts,
                    "hf_retain_freed_memory": args.hf_retain_freed_memory,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
