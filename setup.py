"""Builds peftcore._C: CPU kernels always, CUDA kernels when possible and wanted.

Environment:
  PEFTCORE_BUILD_CUDA=auto|0|1  auto (default): CUDA when torch is a CUDA build and
                                CUDA_HOME is found; 0: never; 1: required (error if impossible).
  TORCH_CUDA_ARCH_LIST          CUDA archs (default "8.0;9.0a+PTX").
  MAX_JOBS                      parallel compile jobs (read by torch's ninja builder).
  PEFTCORE_CPU_BASELINE=avx2    an AVX2-only build (no AVX-512 code at all, every
                                portable kernel compiled once for AVX2 + FMA): how the
                                AVX2 table of benchmarks/README.md is measured.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_decision():
    """(build_cuda, reason) from PEFTCORE_BUILD_CUDA, torch and CUDA_HOME."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("PEFTCORE_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"peftcore build: PEFTCORE_BUILD_CUDA={mode!r}; expected auto, 0 or 1")
    cu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if mode == "0":
        return False, "PEFTCORE_BUILD_CUDA=0", cu_sources
    problems = []
    if not torch.version.cuda:
        problems.append("torch is a CPU build")
    if CUDA_HOME is None:
        problems.append("CUDA_HOME not found")
    if not cu_sources:
        problems.append("no csrc/cuda/*.cu sources")
    if problems:
        if mode == "1":
            raise SystemExit(
                "peftcore build: PEFTCORE_BUILD_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(problems)
            )
        return False, "; ".join(problems), cu_sources
    return True, f"CUDA {torch.version.cuda}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST')}", cu_sources


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    build_cuda, cuda_reason, cu_sources = _cuda_decision()
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    # The wheel runs on CPUs other than the build machine's: no -march=native; the hot
    # kernels carry their own per-ISA clones (see csrc/cpu/lowrank_kernels.cpp).
    # -g0 overrides the -g of Python's CFLAGS (a 7 MB .so and slower builds otherwise).
    cxx = ["-O3", "-g0", "-std=c++20", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
    # at::parallel_for is a header template: compiled without -fopenmp it runs every
    # range on the calling thread (ATen's OpenMP backend is `#pragma omp parallel` in
    # ParallelOpenMP.h). Linux torch wheels use libgomp (soname libgomp.so.1, loaded by
    # torch before peftcore._C), so linking -fopenmp joins torch's one OpenMP runtime.
    # Elsewhere -fopenmp-simd only honours `#pragma omp simd`, and the kernels run on
    # one thread.
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    else:
        cxx.append("-fopenmp-simd")
    if os.environ.get("PEFTCORE_CPU_BASELINE", "").strip().lower() == "avx2":
        cxx += ["-DPEFTCORE_NO_AVX512", "-DPEFTCORE_NO_TARGET_CLONES", "-mavx2", "-mfma", "-mf16c"]
    kwargs = dict(
        name="peftcore._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
    )
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a+PTX")
        cuda_reason = f"CUDA ON (CUDA archs {os.environ['TORCH_CUDA_ARCH_LIST']})"
        ext = CUDAExtension(
            sources=sources + cu_sources,
            extra_compile_args={"cxx": cxx + ["-DPEFTCORE_WITH_CUDA"], "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
            extra_link_args=link,
            **kwargs,
        )
    else:
        cuda_reason = f"CUDA OFF ({cuda_reason})"
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, extra_link_args=link, **kwargs)
    import platform

    isa = "x86-64 dispatch: avx512/avx2/generic" if platform.machine() in ("x86_64", "AMD64") else f"{platform.machine()}: generic"
    if "-DPEFTCORE_NO_AVX512" in cxx:
        isa = "x86-64 AVX2-only build"
    return [ext], f"peftcore build: CPU kernels ON ({isa}); {cuda_reason}"


def main():
    from torch.utils.cpp_extension import BuildExtension

    ext_modules, summary = _extensions()

    class Build(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            # One line, printed only when something was actually compiled/linked.
            print(summary, file=sys.stderr, flush=True)

    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": Build},
        # abi3: the extension has no pybind11 and only uses the limited C API (module.cpp),
        # so one wheel serves every CPython >= 3.10 (torch sets Py_LIMITED_API to 3.10) for a given torch.
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()
