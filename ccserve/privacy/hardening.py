"""Process hardening for a node that serves under the `pcc` policy (issue 8: stateless, no privileged access).

- Not dumpable (prctl PR_SET_DUMPABLE 0) and no core files (RLIMIT_CORE 0): a crash writes no memory image to
  disk, and a same-user process can neither ptrace us nor read /proc/PID/mem.
- Freed host memory is overwritten: CPython's own allocator (pymalloc) keeps freed objects intact in its
  arenas, so a request's prompt and output strings outlive it by minutes. Under PYTHONMALLOC=malloc every
  object goes through glibc, and MALLOC_PERTURB_ makes glibc fill each freed chunk with a fixed byte, except
  chunks it parks in its per-thread cache (tcache), which it returns untouched: the tcache is turned off
  (GLIBC_TUNABLES). All three are read once at process start, so `ccserve serve` re-executes itself with them
  when they are missing.

What this cannot reach is memory that is still allocated: buffers that libraries reuse (the socket read buffer
that held the last request's bytes until the next request overwrites it) and objects still referenced. The
server collects garbage whenever it goes idle so that objects kept alive only by reference cycles (exceptions of
rejected requests, their tracebacks) are freed, and so overwritten, too. tests/privacy/test_memory_residue.py
scans the live server's memory for request canaries and measures what remains.
"""
from __future__ import annotations

import ctypes
import os
import resource
import sys

PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3
SCRUBBING_ALLOCATOR = {"PYTHONMALLOC": "malloc", "MALLOC_PERTURB_": "204",
                       "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
REEXEC_MARK = "CCSERVE_HARDENED"


def harden_process() -> None:
    """No core dumps and not dumpable, from here on (inherited by threads; child processes reset dumpable)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed: cannot make the process "
                                              "undumpable, refusing to serve under the pcc policy")


def is_dumpable() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0


def scrubbing_allocator_active() -> bool:
    return all(os.environ.get(k) == v for k, v in SCRUBBING_ALLOCATOR.items())


def reexec_with_scrubbing_allocator() -> None:
    """Replace this process by the same command under the scrubbing allocator, unless it already runs under
    it. Returns only when nothing needs to change (or when a re-executed process still lacks it, which means
    the environment is being overridden: better to serve hardened otherwise than to loop)."""
    if scrubbing_allocator_active() or os.environ.get(REEXEC_MARK):
        return
    env = {**os.environ, **SCRUBBING_ALLOCATOR, REEXEC_MARK: "1"}
    os.execve(sys.executable, [sys.executable, "-m", "ccserve", *sys.argv[1:]], env)
