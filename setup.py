"""Build and install ddetr-d2 and its extension ``ddetr_d2._C``.

The C++ CPU kernel is always built. The CUDA kernel is added when a CUDA toolkit whose
version matches torch's is found (or ``FORCE_CUDA=1``). If the extension cannot be built,
the install still succeeds with a clear message and the package falls back to the
pure-PyTorch op at run time (set ``DDETR_REQUIRE_EXTENSION=1`` to make that an error).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted():
    """CUDA sources are built with FORCE_CUDA=1, or when nvcc's release equals torch's CUDA version."""
    import subprocess

    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if CUDA_HOME is None or torch.version.cuda is None:
        return False
    try:
        out = subprocess.check_output([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    release = ".".join(torch.version.cuda.split(".")[:2])
    if f"release {release}" not in out:
        print(
            f"ddetr-d2: nvcc in {CUDA_HOME} is not CUDA {release} (torch's); building the CPU kernel only. "
            "Set FORCE_CUDA=1 with a matching toolkit to build the CUDA kernel.",
            file=sys.stderr,
        )
        return False
    return True


def get_extensions():
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CppExtension, CUDAExtension
    except ImportError:
        print("ddetr-d2: torch is not installed; skipping the C++/CUDA extension.", file=sys.stderr)
        return []
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:
        return []
    # no -std flag: torch's BuildExtension adds the standard its headers need (C++17 for torch 2.3;
    # C++20 for newer ones, e.g. 2.14)
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    define_macros = []
    extension = CppExtension
    if _cuda_wanted():
        extension = CUDAExtension
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros += [("WITH_CUDA", None)]
        extra_compile_args["nvcc"] = [
            "-O3",
            "-DCUDA_HAS_FP16=1",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
        ]
    return [
        extension(
            "ddetr_d2._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]


class _OptionalBuildExt:
    """build_ext that reports a failed extension build instead of failing the install."""

    @staticmethod
    def make():
        from torch.utils.cpp_extension import BuildExtension

        class OptionalBuildExt(BuildExtension):
            def run(self):
                try:
                    super().run()
                except Exception as e:  # compiler missing, compile error, ...
                    if os.environ.get("DDETR_REQUIRE_EXTENSION", "0") == "1":
                        raise
                    print(
                        "\n*** ddetr-d2: building the C++/CUDA extension ddetr_d2._C FAILED:\n"
                        f"***   {type(e).__name__}: {e}\n"
                        "*** The package is installed without it and will use the (slow) pure-PyTorch\n"
                        "*** deformable attention. Set DDETR_REQUIRE_EXTENSION=1 to make this an error.\n",
                        file=sys.stderr,
                    )

        return OptionalBuildExt


def get_cmdclass():
    try:
        return {"build_ext": _OptionalBuildExt.make().with_options(use_ninja=False)}
    except ImportError:
        return {}


setup(
    name="ddetr-d2",
    version="0.1.0",
    description="Deformable DETR as a Detectron2 project, with query-propagation tracking",
    python_requires=">=3.10",
    packages=find_packages(exclude=("tests", "tools", "configs", "docs", "video"))
    + ["ddetr_video" + p[len("ddetr_video"):] for p in find_packages("video", exclude=("tests",))],
    package_dir={"ddetr_video": "video/ddetr_video"},
    install_requires=[
        "torch==2.3.1",
        "torchvision==0.18.1",
        "fvcore>=0.1.5,<0.2",
        "iopath>=0.1.9,<0.2",
        "numpy<2",
        "pycocotools>=2.0.7",
        "opencv-python>=4.8,<4.11",
        "scipy>=1.10",
        "numba>=0.59",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "motmetrics==1.4.0",
        "trackeval==1.0.0",
    ],
    extras_require={
        "d2": ["sal-detectron2==0.7.2"],
        "test": ["pytest>=8,<9", "hypothesis>=6.100", "ruff>=0.6", "transformers>=4.40,<5", "timm>=1.0",
                 "onnx>=1.16,<1.20", "onnxruntime>=1.18,<1.24"],
    },
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
    zip_safe=False,
)
