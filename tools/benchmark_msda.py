#!/usr/bin/env python
"""Benchmark the C++ CPU multi-scale deformable attention kernel against the pure-PyTorch reference.

Side by side in one run (same inputs, same threads), median of repeats:
  * forward and forward+backward time of ``ms_deform_attn`` (C++ kernel) vs ``ms_deform_attn_pytorch``;
  * peak memory of one forward(+backward): each measurement runs in a fresh subprocess, which resets the
    kernel's resident-set high-water mark (``/proc/self/clear_refs``) after building the inputs and reads
    ``VmHWM`` afterwards (torch CPU tensors live in malloc'd memory, so RSS is the right measure; glibc's
    mmap threshold is pinned so freed blocks really go back to the OS);
  * a floor for the kernel: compulsory bytes / measured memory bandwidth and FLOPs / measured sgemm rate.

Shapes: an 800x1066 image after a ResNet (levels (100,134), (50,67), (25,34), (13,17)), 8 heads x 32,
4 levels, 4 points; encoder (Len_q = S = 17821) and decoder (Len_q = 300), batch 1 and 2. Sampling
locations are realistic: each query's reference point plus offsets of a few pixels (encoder) or random
reference points (decoder), a few samples falling outside the map.

Times are wall-clock medians ("speedup" = pytorch / kernel); "cpu-time x" is the same ratio of process
CPU time, which is steadier than wall time on a loaded machine (both ops use the same threads).

Usage: python tools/benchmark_msda.py [--quick] [--threads N] [--no-memory]
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SPATIAL_SHAPES = [(100, 134), (50, 67), (25, 34), (13, 17)]
N_HEADS, HEAD_DIM, N_POINTS = 8, 32, 4
CASES = [("encoder", 1, None), ("encoder", 2, None), ("decoder", 1, 300), ("decoder", 2, 300)]


def make_inputs(kind, batch, len_q, dtype=torch.float32, seed=0):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SPATIAL_SHAPES, dtype=torch.long)
    areas = shapes[:, 0] * shapes[:, 1]
    start = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    L = len(SPATIAL_SHAPES)
    value = torch.randn(batch, S, N_HEADS, HEAD_DIM, generator=g, dtype=dtype)
    wh = shapes.flip(-1).to(dtype)  # (L, 2) as (W, H)
    if kind == "encoder":
        # reference point = pixel centre of each query on its own level
        refs = []
        for H, W in SPATIAL_SHAPES:
            ys, xs = torch.meshgrid(torch.arange(H, dtype=dtype), torch.arange(W, dtype=dtype), indexing="ij")
            refs.append(torch.stack([(xs.flatten() + 0.5) / W, (ys.flatten() + 0.5) / H], -1))
        ref = torch.cat(refs)[None].expand(batch, S, 2)
        len_q = S
    else:
        ref = torch.rand(batch, len_q, 2, generator=g, dtype=dtype)
    offsets = torch.randn(batch, len_q, N_HEADS, L, N_POINTS, 2, generator=g, dtype=dtype) * 2.0  # pixels
    loc = ref[:, :, None, None, None, :] + offsets / wh[None, None, None, :, None, :]
    logits = torch.randn(batch, len_q, N_HEADS, L * N_POINTS, generator=g, dtype=dtype)
    attn = logits.softmax(-1).view(batch, len_q, N_HEADS, L, N_POINTS)
    return value, shapes, start, loc.contiguous(), attn


def get_impls():
    from ddetr_d2.ops import _extension
    from ddetr_d2.ops.ms_deform_attn_function import MSDeformAttnFunction
    from ddetr_d2.ops.ms_deform_attn_pytorch import ms_deform_attn_pytorch

    if _extension.get_extension() is None:
        sys.exit(f"ddetr_d2._C is not available: {_extension.extension_error()}")

    def kernel(*args):
        return MSDeformAttnFunction.apply(*args, 64)

    return {"kernel": kernel, "pytorch": ms_deform_attn_pytorch}


def run_once(fn, inputs, backward):
    if backward:
        value, shapes, start, loc, attn = inputs
        leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
        out = fn(leaves[0], shapes, start, leaves[1], leaves[2])
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            fn(*inputs)


def time_impl(fn, inputs, backward, repeats):
    """(median wall seconds, median process CPU seconds) of one call."""
    run_once(fn, inputs, backward)  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run_once(fn, inputs, backward)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(impl, kind, batch, len_q, backward):
    """Runs in a subprocess: peak RSS growth (MiB) of one call, inputs excluded."""
    inputs = make_inputs(kind, batch, len_q)
    fn = get_impls()[impl]
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    run_once(fn, inputs, backward)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024.0}))


def measure_memory(impl, kind, batch, len_q, backward, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    args = [sys.executable, __file__, "--_memory-child", json.dumps([impl, kind, batch, len_q, backward])]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def machine_rates(threads):
    """(memory bandwidth in GB/s from a large copy, sgemm GFLOP/s), measured now with `threads` threads."""
    x = torch.empty(64 * 2**20 // 4)  # 256 MiB source
    x.fill_(1.0)
    y = torch.empty_like(x)
    y.copy_(x)
    copies = []
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        copies.append(time.perf_counter() - t0)
    bandwidth = 2 * x.numel() * 4 / min(copies) / 1e9  # read + write
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    a @ b
    mm = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        mm.append(time.perf_counter() - t0)
    return bandwidth, 2 * 1024**3 / min(mm) / 1e9


def floor_seconds(kind, batch, len_q, backward, bandwidth, gflops):
    """Lower bound: compulsory DRAM bytes / bandwidth vs arithmetic / sgemm rate, whichever is larger."""
    S = sum(h * w for h, w in SPATIAL_SHAPES)
    Q = S if kind == "encoder" else len_q
    L, M, D, P = len(SPATIAL_SHAPES), N_HEADS, HEAD_DIM, N_POINTS
    samples = batch * Q * M * L * P
    value_b = batch * S * M * D * 4
    io_b = samples * 3 * 4 + batch * Q * M * D * 4  # loc + attn read, output write
    flops = samples * (4 * D * 2 + 30)  # 4 corners x D fused multiply-adds + corner weights
    bytes_ = value_b + io_b
    if backward:
        # forward again is not needed by the kernel; backward reads value, grad_out, loc, attn and writes
        # grad_value (+ zero-fill), grad_loc, grad_attn; two 4-corner passes over D per sample.
        bytes_ += 3 * value_b + io_b + samples * 3 * 4
        flops += samples * (4 * D * 4 + 40)
    gathered = samples * 4 * D * 4 * (3 if backward else 1)  # corner rows read (and written) per pass
    return max(bytes_ / (bandwidth * 1e9), flops / (gflops * 1e9)), bytes_, flops, gathered


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 1 only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(*json.loads(args.memory_child))
        return

    repeats = args.repeats or (3 if args.quick else 7)
    cases = [c for c in CASES if c[1] == 1] if args.quick else CASES
    impls = get_impls()
    bandwidth, gflops = machine_rates(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}, "
        f"repeats {repeats} (median); measured copy bandwidth {bandwidth:.1f} GB/s, "
        f"sgemm {gflops:.0f} GFLOP/s"
    )
    if hasattr(os, "getloadavg"):
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
    header = (
        f"{'case':<18}{'pass':<9}{'kernel ms':>10}{'pytorch ms':>11}{'speedup':>9}{'cpu-time x':>11}"
        f"{'kern MiB':>10}{'pyt MiB':>9}{'mem ratio':>10}{'floor ms':>10}{'kern/floor':>11}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for kind, batch, len_q in cases:
        inputs = make_inputs(kind, batch, len_q)
        for backward in (False, True):
            t_k, c_k = time_impl(impls["kernel"], inputs, backward, repeats)
            t_p, c_p = time_impl(impls["pytorch"], inputs, backward, max(1, repeats // 2 + 1))
            if args.no_memory:
                m_k = m_p = float("nan")
            else:
                m_k = measure_memory("kernel", kind, batch, len_q, backward, args.threads)
                m_p = measure_memory("pytorch", kind, batch, len_q, backward, args.threads)
            fl, _, _, gathered = floor_seconds(kind, batch, len_q, backward, bandwidth, gflops)
            name = f"{kind} b{batch} q{inputs[3].shape[1]}"
            pass_ = "fwd+bwd" if backward else "fwd"
            row = (
                name,
                pass_,
                t_k * 1e3,
                t_p * 1e3,
                t_p / t_k,
                c_p / c_k,
                m_k,
                m_p,
                m_p / m_k if m_k else float("nan"),
                fl * 1e3,
                t_k / fl,
                gathered / t_k / 1e9,
            )
            rows.append(row)
            print(
                f"{row[0]:<18}{row[1]:<9}{row[2]:>10.1f}{row[3]:>11.1f}{row[4]:>8.1f}x{row[5]:>10.1f}x"
                f"{row[6]:>10.1f}{row[7]:>9.1f}{row[8]:>9.1f}x{row[9]:>10.1f}{row[10]:>10.1f}x{row[11]:>10.1f}",
                flush=True,
            )
    if hasattr(os, "getloadavg"):
        print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
