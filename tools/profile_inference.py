#!/usr/bin/env python
"""
Where the CPU inference time of the R-50 detector goes, for the inference-only layout settings: the
eval forward (``forward_outputs``, no pre/post-processing) and the backbone alone, timed side by side in
one process for float32 / bfloat16 x NCHW / channels-last x batch norms folded or not, on the same random
weights, then a torch.profiler table (top ops by self CPU time) of the default bf16 setting (or of
``--profile-dtype``; with ``--profile-compiled`` the model as ``INFERENCE_COMPILE`` runs it: compiled with
weight freezing, Inductor's fused kernels named in the table).

Usage: python tools/profile_inference.py [--size 800x1066] [--threads 2] [--repeats 3] [--variant plain]
       [--dtypes float32 bfloat16] [--no-table] [--no-profile] [--profile-dtype bfloat16]
       [--profile-compiled] [--no-retain-freed-memory]
(pin the cores with ``taskset -c 0,1`` for figures comparable with tools/benchmark_inference.py)
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark_inference import VARIANTS, our_cfg, positive_int, size_arg  # noqa: E402  (tools/, this script's folder)

import ddetr_d2  # noqa: F401, E402  (registers the config keys and the meta-architecture)
from ddetr_d2.allocator import retain_freed_memory  # noqa: E402
from ddetr_d2.modeling.fuse_batchnorm import fuse_batchnorm  # noqa: E402
from ddetr_d2.modeling.inference_precision import inference_autocast  # noqa: E402


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=size_arg, default="800x1066")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--variant", choices=list(VARIANTS), default="plain")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-table", action="store_true", help="skip the layout table (profile only)")
    p.add_argument("--profile-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument(
        "--profile-compiled",
        action="store_true",
        help="profile the model compiled with weight freezing (INFERENCE_COMPILE's default)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=("float32", "bfloat16"),
        default=["float32", "bfloat16"],
        help="bfloat16 is emulated (~20x slower than float32) on CPUs without AVX512-BF16 / AMX",
    )
    p.add_argument(
        "--no-retain-freed-memory",
        action="store_true",
        help="leave glibc malloc as it is (default: keep freed memory, like INFERENCE_RETAIN_FREED_MEMORY)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    retained = False if args.no_retain_freed_memory else retain_freed_memory()
    from detectron2.modeling import build_model

    h, w = (int(v) for v in args.size.split("x"))
    cfg = our_cfg(args.variant, "", args.size)  # the benchmark's config: ddetr_r50.yaml, CPU, this size
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    fused = copy.deepcopy(plain)
    n_fused = fuse_batchnorm(fused.backbone)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    with torch.no_grad():
        images = plain.preprocess_image([{"image": image, "height": h, "width": w}])
    print(
        f"size {args.size}, variant {args.variant}, threads {args.threads}, repeats {args.repeats} "
        f"(+1 warm-up), torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{n_fused} convolutions with a batch norm folded, malloc keeps freed memory: {retained}"
    )

    def run(model, dtype, channels_last, part):
        model.inference_dtype, model.inference_channels_last = dtype, channels_last

        def once():
            with torch.no_grad(), inference_autocast(dtype, "cpu"):
                if part == "backbone":
                    x = images.tensor
                    return model.backbone(
                        x.contiguous(memory_format=torch.channels_last) if channels_last else x
                    )
                return model.forward_outputs(images)

        return once

    if not args.no_table:
        layout_table(args, plain, fused, run)
    if args.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    dtype = args.profile_dtype
    once = run(fused, dtype, True, "whole")
    what = f"{dtype}, NHWC, fused BN"
    if args.profile_compiled:
        import torch._inductor.config as inductor_config

        from ddetr_d2.modeling.inference_compile import compile_for_inference

        inductor_config.cpp.enable_kernel_profile = True  # the generated kernels appear in the table
        n = compile_for_inference(fused, freezing=True)
        t0 = time.perf_counter()
        once()
        print(f"compiled {n} modules (freezing): first call {time.perf_counter() - t0:.1f} s")
        what += ", compiled with freezing"
    once()
    t0 = time.perf_counter()
    once()
    print(f"{what}: one forward {time.perf_counter() - t0:.3f} s (unprofiled)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        once()
    print(f"{what}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def layout_table(args, plain, fused, run):
    ref = run(plain, "float32", False, "whole")()["pred_logits"]
    print("| setting | whole forward s | backbone s | max abs logit diff vs fp32 NCHW unfused |")
    print("|---|---|---|---|")
    for dtype in args.dtypes:
        for channels_last in (False, True):
            for name, model in (("unfused", plain), ("fused BN", fused)):
                t_whole = median_time(run(model, dtype, channels_last, "whole"), args.repeats)
                t_bb = median_time(run(model, dtype, channels_last, "backbone"), args.repeats)
                diff = (run(model, dtype, channels_last, "whole")()["pred_logits"].float() - ref).abs().max()
                layout = "NHWC" if channels_last else "NCHW"
                print(f"| {dtype} {layout} {name} | {t_whole:.3f} | {t_bb:.3f} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
