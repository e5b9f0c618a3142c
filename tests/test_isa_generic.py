"""The portable (non-AVX-512) kernels, forced with PEFTCORE_CPU_ISA=generic, pass the same
op tests as the AVX-512 ones. On a machine without AVX-512 both runs use them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import peftcore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not peftcore.native_available("lora_linear"), reason="native kernels not built")
def test_generic_kernels_pass_op_tests():
    env = dict(os.environ, PEFTCORE_CPU_ISA="generic")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/ops/test_lora_linear.py", "tests/ops/test_lora_embedding.py",
         "tests/ops/test_ia3_linear.py", "tests/ops/test_mixed_ops.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
