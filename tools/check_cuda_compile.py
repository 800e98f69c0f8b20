#!/usr/bin/env python
"""Compile-only check of the CUDA sources (``csrc/**/*.cu``) with the machine's nvcc, without a GPU.

Usage:
    python tools/check_cuda_compile.py [--arch 80 90] [--keep] [--jobs N]

Exit status 0 when every file compiles for every architecture; otherwise the failing nvcc command and its
output are printed and the exit status is 1 (2 when no nvcc is found). The logic is
``ddetr_d2.ops.cuda_compile`` (see docs/cuda.md).
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import sys

from ddetr_d2.ops.cuda_compile import main

if __name__ == "__main__":
    sys.exit(main())
