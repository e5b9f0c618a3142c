// How the portable kernels (lowrank_kernels.cpp, quant_generic.cpp) are compiled for
// several x86-64 levels: PEFTCORE_CLONES on an entry point makes GCC / Clang emit it
// for x86-64-v4, v3 (AVX2 + FMA) and baseline, the loader picking one per CPU.
#pragma once

// target_clones needs GCC >= 11 (x86-64-vN names) or Clang >= 16 and an ELF
// loader with ifunc; anywhere else the plain code is compiled once.
#if defined(__x86_64__) && defined(__linux__) && !defined(PEFTCORE_NO_TARGET_CLONES) && \
    ((defined(__clang__) && __clang_major__ >= 16) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define PEFTCORE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PEFTCORE_CLONES
#endif

// Templates are forced inline into the cloned entry points so that each clone gets
// its own vectorised copy (a template cannot carry target_clones itself).
#if defined(__GNUC__) || defined(__clang__)
#define PEFTCORE_INLINE inline __attribute__((always_inline))
#else
#define PEFTCORE_INLINE inline
#endif
