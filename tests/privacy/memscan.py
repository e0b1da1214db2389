"""Search a live process's memory for byte strings (the canary scan of issue 8): every readable, writable,
private mapping of /proc/PID/maps (heap, anonymous memory, thread stacks, the writable data of loaded
libraries), read through /proc/PID/mem. Read-only and shared file mappings hold code and files, not request
data, and are skipped."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hit:
    needle: bytes
    region: str      # the mapping's path, or [heap] / [stack] / [anon]
    address: int


def writable_regions(pid: int) -> list[tuple[int, int, str]]:
    regions = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            perms = parts[1]
            name = parts[5].strip() if len(parts) > 5 else "[anon]"
            if perms.startswith("rw") and perms[3] == "p" and name not in ("[vvar]", "[vsyscall]", "[vdso]"):
                regions.append((lo, hi, name))
    return regions


def scan(pid: int, needles: list[bytes], chunk: int = 64 << 20) -> list[Hit]:
    """Every occurrence of every needle in the process's writable private memory (overlapping reads so that
    a needle spanning two reads is still found)."""
    hits = []
    overlap = max(len(n) for n in needles) - 1
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for lo, hi, name in writable_regions(pid):
            pos = lo
            while pos < hi:
                size = min(chunk + overlap, hi - pos)
                try:
                    mem.seek(pos)
                    data = mem.read(size)
                except OSError:       # guard pages and the like
                    break
                for needle in needles:
                    at = data.find(needle)
                    while at != -1:
                        if at < chunk or pos + size >= hi:
                            hits.append(Hit(needle, name, pos + at))
                        at = data.find(needle, at + 1)
                pos += chunk
    return sorted(set(hits), key=lambda h: h.address)
