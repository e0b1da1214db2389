"""Test-wide setup: Triton runs in its CPU interpreter here (CI has no GPU)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
