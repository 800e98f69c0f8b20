"""Compile-only check of the CUDA sources (``csrc/**/*.cu``) without a GPU (``tools/check_cuda_compile.py``).

Every ``.cu`` under ``csrc/`` is compiled with the machine's ``nvcc`` straight to an object file (``-c``)
for the requested architectures, with the include dirs and defines of the real extension build. Nothing is
linked or run. ``nvcc`` is called directly because ``torch.utils.cpp_extension`` refuses a toolkit whose
major version differs from the one torch was built with (e.g. CUDA 13 nvcc vs torch 2.3.1+cu121).

``main(argv)`` returns 0 when every file compiles for every architecture; otherwise the failing nvcc
command and its output are printed and it returns 1 (2 when no nvcc is found).
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

# the repository of an editable install (csrc/ is not installed with the package)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(REPO, "csrc")
DEFAULT_ARCHS = ("80", "90")

# Flags, and why:
#   -std=c++17                  torch 2.3 headers need C++17.
#   --expt-relaxed-constexpr    ATen/cuda/Atomic.cuh calls constexpr std::max from __host__ __device__ code
#                               (warning #20013 otherwise); torch's own build passes it too.
#   -Xcompiler -fPIC            the object goes into a shared library (the extension).
#   -D__CUDA_NO_HALF_*          the flags setup.py passes to nvcc (as torch's build does): the kernel must not
#                               rely on implicit __half conversions / operators.
#   -DWITH_CUDA, -DTORCH_EXTENSION_NAME=_C, -D_GLIBCXX_USE_CXX11_ABI=<torch's>  as in the real build.
#   nvidia/*/include as -isystem: torch's ATen/cuda headers include cublas / cusparse / cusolver headers,
#   which the pip wheels of those libraries provide (a bare nvcc install has none). -isystem dirs are searched
#   after nvcc's own -I<toolkit>/include, so the toolkit's cuda_runtime.h etc. always win over the older
#   copies shipped in nvidia/cuda_runtime/include (never mix runtime headers of two CUDA versions).
NVCC_FLAGS = [
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "-Xcompiler",
    "-fPIC",
    "-DWITH_CUDA",
    "-DTORCH_EXTENSION_NAME=_C",
    "-DCUDA_HAS_FP16=1",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def find_nvcc():
    """Path of nvcc: $NVCC, then PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin; None if absent."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[-1].strip() if lines else out.strip()


def cuda_sources(root=CSRC):
    return sorted(glob.glob(os.path.join(root, "**", "*.cu"), recursive=True))


def include_flags():
    """-I/-isystem flags: csrc, torch (cuda=False: the CUDA headers come from nvcc), python, pip nvidia/*."""
    import torch
    from torch.utils.cpp_extension import include_paths

    flags = ["-I", CSRC]
    for d in include_paths(cuda=False):
        if os.path.isdir(d):  # torch 2.3 still lists TH / THC, which no longer exist
            flags += ["-I", d]
    flags += ["-I", sysconfig.get_paths()["include"]]
    site = os.path.dirname(os.path.dirname(torch.__file__))
    for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
        flags += ["-isystem", d]
    return flags


def cubin_sms(obj):
    """SM versions of the CUDA ELF images (cubins) embedded in an object file; empty if none can be read.

    Scans for embedded ELF headers with e_machine == EM_CUDA (190). The SM version is in byte 0 of
    e_flags in the old CUDA ELF ABI and in byte 1 in the new one (CUDA >= 12.8); the plausible one is
    taken. A compressed fatbin hides its images: then the result is empty (nothing can be said).
    """
    import struct

    with open(obj, "rb") as f:
        data = f.read()
    sms, i = set(), data.find(b"\x7fELF", 1)
    while i >= 0:
        if i + 52 <= len(data) and data[i + 4] == 2 and struct.unpack_from("<H", data, i + 18)[0] == 190:
            flags = struct.unpack_from("<I", data, i + 48)[0]
            for sm in (flags & 0xFF, (flags >> 8) & 0xFF):
                if 30 <= sm <= 150:
                    sms.add(sm)
                    break
        i = data.find(b"\x7fELF", i + 4)
    return sms


def build_command(nvcc, source, obj, archs, threads):
    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [nvcc, "-c", source, "-o", obj]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    if len(archs) > 1 and threads > 1:
        cmd += ["--threads", str(threads)]  # compile the architectures in parallel inside one nvcc call
    cmd += NVCC_FLAGS + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"] + include_flags()
    return cmd


def compile_one(nvcc, source, outdir, archs, threads):
    """Compile one .cu; returns dict(source, ok, seconds, cmd, output, obj, warnings, sms)."""
    rel = os.path.relpath(source, REPO)
    obj = os.path.join(outdir, rel.replace(os.sep, "__") + ".o")
    cmd = build_command(nvcc, source, obj, archs, threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    ok = proc.returncode == 0 and os.path.isfile(obj) and os.path.getsize(obj) > 0
    output = proc.stdout + proc.stderr
    warnings = [ln for ln in output.splitlines() if "warning" in ln.lower()]
    sms = cubin_sms(obj) if ok else set()
    missing = sorted(int(a) for a in archs if sms and int(a) not in sms)
    if missing:  # nvcc succeeded but an image is absent: count it as a failure
        ok = False
        output += f"\nobject {obj} holds cubins for sm {sorted(sms)}, missing {missing}"
    return dict(
        source=rel, ok=ok, seconds=seconds, cmd=cmd, output=output, obj=obj, warnings=warnings, sms=sms
    )


def check(archs=DEFAULT_ARCHS, keep=False, jobs=None, verbose=True):
    """Compile every csrc/**/*.cu. Returns the list of per-file result dicts (raises if nvcc is missing)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (looked at $NVCC, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    sources = cuda_sources()
    if not sources:
        raise FileNotFoundError(f"no .cu files under {CSRC}")
    archs = tuple(str(a) for a in archs)
    cpus = os.cpu_count() or 1
    jobs = jobs or max(1, min(len(sources), cpus))
    threads = max(1, min(len(archs), cpus // jobs))
    outdir = tempfile.mkdtemp(prefix="ddetr_cuda_compile_")
    if verbose:
        print(
            f"nvcc: {nvcc} ({nvcc_version(nvcc)}); archs: {', '.join('sm_' + a for a in archs)}; "
            f"{len(sources)} file(s), {jobs} job(s) x {threads} nvcc thread(s)"
        )
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda s: compile_one(nvcc, s, outdir, archs, threads), sources))
        if verbose:
            for r in results:
                status = "ok" if r["ok"] else "FAILED"
                found = ", ".join(f"sm_{sm}" for sm in sorted(r["sms"])) or "not readable"
                print(f"  {status:6s} {r['source']}  ({r['seconds']:.1f} s; cubins: {found})")
                if not r["ok"]:
                    print("    command: " + subprocess.list2cmdline(r["cmd"]))
                    print("    nvcc output:\n" + r["output"])
                elif r["warnings"]:
                    print(f"    {len(r['warnings'])} warning(s):\n      " + "\n      ".join(r["warnings"]))
            if keep:
                print(f"objects kept in {outdir}")
    finally:
        if not keep:
            shutil.rmtree(outdir, ignore_errors=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="SM versions, e.g. 80 90")
    parser.add_argument("--keep", action="store_true", help="keep the object files (path is printed)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (default: #cpus)")
    args = parser.parse_args(argv)
    try:
        results = check(args.arch, keep=args.keep, jobs=args.jobs)
    except FileNotFoundError as e:
        print(f"check_cuda_compile: {e}", file=sys.stderr)
        return 2
    n_bad = sum(not r["ok"] for r in results)
    print(f"{len(results) - n_bad}/{len(results)} file(s) compiled")
    return 1 if n_bad else 0
