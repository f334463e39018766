"""Where a CPU run's resident memory is: run an orpo command in this process while a thread reads glibc's own
accounting (mallinfo2) and the process's RSS every 20 ms, then print, at the moment of peak RSS, how it splits.

    .venv/bin/python bench/rss_split.py train CONFIG [key=value ...]

The split (GiB, one JSON line after `RSS-SPLIT`):
  heap      the main heap's extent: malloc's tensors under its mmap threshold (dynamic, at most 32 MiB), in use
            or freed and kept (glibc returns a heap's freed memory only from its top)
  heap_free the part of `heap` that is free: resident, yet holding no tensor (fragmentation and retention)
  mmapped   tensors malloc placed in their own mappings (32 MiB and up, and smaller ones before the threshold
            rises); given back to the system the moment they are freed
  other     the rest: Python, the libraries' code and data, the model's weights read from safetensors files
  live_max  the largest in-use malloc total (heap in use + mmapped) seen at any sample: what the tensors needed
  heap_max  the largest heap extent seen

glibc only (Linux); one arena (the training thread's), which is where orpo's tensors are allocated.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import sys
import threading
import time

GIB = 2**30


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def main() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    page = 4096

    def sample() -> dict[str, int]:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
        m = libc.mallinfo2()
        return {"rss": rss, "heap": m.arena, "heap_free": m.fordblks, "mmapped": m.hblkhd, "in_use": m.uordblks}

    top: dict[str, int] = {"rss": 0}
    most = {"live_max": 0, "heap_max": 0}

    def watch() -> None:
        while True:
            s = sample()
            most["live_max"] = max(most["live_max"], s["in_use"] + s["mmapped"])
            most["heap_max"] = max(most["heap_max"], s["heap"])
            if s["rss"] > top["rss"]:
                top.clear()
                top.update(s)
            time.sleep(0.02)

    @atexit.register
    def report() -> None:
        if top["rss"]:
            split = {k: top[k] for k in ("rss", "heap", "heap_free", "mmapped")}
            split["other"] = top["rss"] - top["heap"] - top["mmapped"]
            print("RSS-SPLIT " + json.dumps({k: round(v / GIB, 3) for k, v in (split | most).items()}), flush=True)

    threading.Thread(target=watch, daemon=True).start()
    from orpo.cli import main as orpo

    sys.argv = ["orpo", *sys.argv[1:]]
    orpo()


if __name__ == "__main__":
    main()
