"""Compile-only check of the CUDA sources with the machine's nvcc (no GPU needed).

Skipped (with the reason) only when no nvcc exists. Otherwise every csrc/**/*.cu must compile to an
object for sm_80 and sm_90 (checked in the embedded cubins where readable), without warnings from our
own sources.
"""

import os
import subprocess

import pytest

from ddetr_d2.ops import cuda_compile as tool


def test_command_line_has_archs_and_build_flags():
    cmd = tool.build_command("nvcc", "csrc/cuda/x.cu", "/tmp/x.o", ["80", "90"], threads=2)
    joined = " ".join(cmd)
    assert "-gencode arch=compute_80,code=sm_80" in joined and "-gencode arch=compute_90,code=sm_90" in joined
    for flag in ("-c", "-std=c++17", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "--expt-relaxed-constexpr"):
        assert flag in cmd
    assert any(f.startswith("-D_GLIBCXX_USE_CXX11_ABI=") for f in cmd)
    includes = [cmd[i + 1] for i, f in enumerate(cmd) if f in ("-I", "-isystem")]
    assert tool.CSRC in includes and all(os.path.isdir(d) for d in includes)
    # The pip CUDA headers come last (-isystem) so the toolkit's own runtime headers win.
    nvidia = [cmd[i + 1] for i, f in enumerate(cmd) if f == "-isystem"]
    assert all(os.sep + "nvidia" + os.sep in d for d in nvidia)


def test_every_cuda_source_compiles_for_sm80_and_sm90():
    nvcc = tool.find_nvcc()
    if nvcc is None:
        pytest.skip(
            "no nvcc found ($NVCC, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): cannot compile-check CUDA"
        )
    sources = tool.cuda_sources()
    assert any(s.endswith(os.path.join("cuda", "ms_deform_attn_cuda.cu")) for s in sources), sources
    results = tool.check(archs=("80", "90"), verbose=False)
    assert len(results) == len(sources)
    for r in results:
        assert r["ok"], (
            f"{r['source']} failed to compile:\n{subprocess.list2cmdline(r['cmd'])}\n{r['output'][-6000:]}"
        )
        # When the embedded cubins are readable (uncompressed fatbin), both architectures must be there.
        assert not r["sms"] or {80, 90} <= r["sms"], f"{r['source']}: cubins for sm {sorted(r['sms'])}"
        ours = [w for w in r["warnings"] if "csrc/" in w]
        assert not ours, f"{r['source']}: nvcc warnings in our sources:\n" + "\n".join(ours)


def test_cli_reports_missing_nvcc(monkeypatch, capsys):
    monkeypatch.setattr(tool, "find_nvcc", lambda: None)
    assert tool.main([]) == 2
    assert "nvcc not found" in capsys.readouterr().err


def test_cli_fails_on_compile_error(monkeypatch, tmp_path, capsys):
    nvcc = tool.find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc found: cannot compile-check CUDA")
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(int* x) { x[0] = undefined_identifier; }\n")
    monkeypatch.setattr(tool, "cuda_sources", lambda: [str(broken)])
    assert tool.main(["--arch", "80"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "undefined_identifier" in out and "-gencode arch=compute_80,code=sm_80" in out
