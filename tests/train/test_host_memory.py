"""The trainer hands freed heap pages back to the OS after initialising, restoring and compiling
(``loop.release_freed_host_memory``): pages freed in the middle of the heap stay resident
otherwise, and add to the first step's peak RSS."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    from dar_jax.train.loop import release_freed_host_memory

    def anon_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024

    blocks = [bytearray(64 << 10) for _ in range(4096)]   # 256 MiB of 64 KiB heap chunks
    for b in blocks:
        b[::4096] = b"x" * len(b[::4096])                  # touch every page
    keep = blocks[-1]                                      # pins the heap's top: no automatic trim
    del blocks[:-1]
    before = anon_mib()
    release_freed_host_memory()
    print(before, anon_mib())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
def test_freed_heap_pages_are_released():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(float, out.stdout.split()[-2:])
    assert before - after > 200, (before, after)          # most of the freed 256 MiB went back
