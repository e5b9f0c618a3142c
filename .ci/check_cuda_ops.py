"""CI check, no GPU needed: every ``peftcore::`` op with a CPU kernel also has a CUDA kernel.

Run with the Python of an environment where peftcore was built with PEFTCORE_BUILD_CUDA=1
(``make cuda-build``). The op list is peftcore's op table (``peftcore._ops.OPS``, each
forward op with its ``.out`` overload) together with every registered ``peftcore::`` op,
so a new op without a CPU or a CUDA kernel fails it.

  --allow-missing PATTERN   (repeatable; fnmatch on the op name without ``peftcore::``)
                            report such ops but do not fail on them.
Exit status 1 when an op lacks a CUDA kernel (and is not allowed to), or when the
imported peftcore has no CUDA kernel at all (a CPU-only build, or the source tree's
CPU extension imported instead of the installed one).
"""
from __future__ import annotations

import argparse
import fnmatch
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allow-missing", action="append", default=[], metavar="PATTERN")
    args = ap.parse_args()

    import peftcore  # loads peftcore._C: registers the kernels
    from peftcore import native

    if native._C_ERROR is not None:
        print(f"peftcore._C failed to load: {native._C_ERROR}", file=sys.stderr)
        return 1
    from peftcore._ops import OPS

    table = {f"peftcore::{n}{o}" for n, d in OPS.items() for o in ("", ".out")[:1 + d.forward]}
    names = sorted(table | {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("peftcore::")})
    no_cpu = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]
    if no_cpu:
        print(f"{len(no_cpu)} op(s) without a CPU kernel: {', '.join(no_cpu)}", file=sys.stderr)
        return 1
    missing, allowed = [], []
    print(f"peftcore from {peftcore.__file__}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    for n in names:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
        short = n.split("::", 1)[1]
        ok = has or any(fnmatch.fnmatchcase(short, p) for p in args.allow_missing)
        print(f"  {n:40s} CPU yes  CUDA {'yes' if has else 'NO' + ('' if not ok else ' (allowed)')}")
        if not has:
            (allowed if ok else missing).append(n)
    if len(missing) + len(allowed) == len(names):
        print("no peftcore:: op has a CUDA kernel: this peftcore was built without CUDA", file=sys.stderr)
        return 1
    if missing:
        print(f"{len(missing)} op(s) with a CPU kernel but no CUDA kernel: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"{len(names) - len(allowed)} ops with CPU and CUDA kernels"
          + (f"; {len(allowed)} allowed without: {', '.join(allowed)}" if allowed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
