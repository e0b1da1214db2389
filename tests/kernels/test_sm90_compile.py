"""The interpreter runs none of Triton's compiler, so a kernel can pass every reference test and still fail to
build for the H100 (a module global read inside a kernel, a dtype the backend rejects). This builds the
attention and KV-store kernels for sm_90, for the model dtype and every quantized preset, as their wrappers
launch them (tests/kernels/sm90_compile.py)."""
import os
import subprocess
import sys
from pathlib import Path

from ccserve.kv.formats import PRESETS


def test_attention_and_store_kernels_build_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_ALWAYS_COMPILE="1", TRITON_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile", *PRESETS], env=env,
                         cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "FAIL" not in out.stdout, out.stdout
    built = out.stdout.count(": compiled")
    assert built >= 5 * len(PRESETS), out.stdout   # decode (2 split modes), reduce, prefill, store per format
