"""Builds peftcore._C: CPU kernels always, CUDA kernels when possible and wanted.

Environment:
  PEFTCORE_BUILD_CUDA=auto|0|1  auto (default): CUDA when torch is a CUDA build and
                                CUDA_HOME is found; 0: never; 1: required (error if impossible).
  TORCH_CUDA_ARCH_LIST          CUDA archs. Unset: the visible GPUs' archs (+PTX for the
                                newest), or, with no GPU visible, DEFAULT_CUDA_ARCHS.
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

# Archs built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a builder
# machine): one cubin per major version from Ampere on (an sm_X0 cubin runs on every
# sm_Xy, y >= 0: 8.0 covers A10 / L4 / L40S, 10.0 covers B300), plus PTX of the newest so
# a later GPU can still JIT the kernels. (9.0, not 9.0a: sm_90a code is not forward
# compatible, and no kernel here uses wgmma / TMA yet.)
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"


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
    # Fixed here, before torch's cpp_extension reads it (see _cuda_archs).
    os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_archs()
    return True, f"CUDA {torch.version.cuda}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}", cu_sources


def _cuda_archs():
    """TORCH_CUDA_ARCH_LIST as torch's cpp_extension will read it: the user's value, or
    the visible GPUs' archs (+PTX for the newest: torch's own default, the local-GPU build
    that `pip install` on a GPU machine wants), or DEFAULT_CUDA_ARCHS without a GPU (torch
    would otherwise fail on an empty list)."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    try:
        n = torch.cuda.device_count()
    except Exception:  # no driver: same as no GPU
        n = 0
    if n == 0:
        return DEFAULT_CUDA_ARCHS
    caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(n)})
    return ";".join(caps[:-1] + [caps[-1] + "+PTX"])


def _nvcc_flags():
    # torch 2.14's headers need C++20. --expt-relaxed-constexpr: std:: constexpr helpers
    # in device code (numeric_limits); -lineinfo keeps source lines for profilers at no
    # run-time cost. PEFTCORE_PTXAS_VERBOSE=1 adds -Xptxas -v (register / spill report,
    # how benchmarks/ptxas.txt is made).
    flags = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-DPEFTCORE_WITH_CUDA"]
    if os.environ.get("PEFTCORE_PTXAS_VERBOSE", "0") == "1":
        flags += ["-Xptxas", "-v"]
    return flags


def _nvidia_wheel_dirs():
    """(include, lib) folders of the CUDA libraries that ATen's CUDA headers include
    (cuBLAS, cuSPARSE, ...): with a pip-installed CUDA torch they live in the nvidia wheels
    beside torch (site-packages/nvidia/cu<major>/{include,lib}), not in every toolkit.
    Either is None when absent."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    base = os.path.join(site, "nvidia", "cu" + (torch.version.cuda or "").split(".")[0])
    inc, lib = os.path.join(base, "include"), os.path.join(base, "lib")
    return (inc if os.path.isdir(inc) else None), (lib if os.path.isdir(lib) else None)


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
        # The wheels' headers as system folders: searched after the toolkit's own -I folder,
        # so the toolkit's CUDA runtime headers win and only what it lacks comes from there.
        inc, lib = _nvidia_wheel_dirs()
        sys_inc = ["-isystem", inc] if inc else []
        ext = CUDAExtension(
            sources=sources + cu_sources,
            extra_compile_args={"cxx": cxx + sys_inc + ["-DPEFTCORE_WITH_CUDA"], "nvcc": _nvcc_flags() + sys_inc},
            extra_link_args=link,
            library_dirs=[lib] if lib else [],
            **kwargs,
        )
        cuda_reason = f"CUDA ON ({cuda_reason})"
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
