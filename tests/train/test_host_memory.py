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


ARENAS = textwrap.dedent("""
    import ctypes, sys, threading
    from dar_jax.train.loop import limit_host_malloc_arenas

    capped = limit_host_malloc_arenas() if sys.argv[1] == "cap" else False
    barrier = threading.Barrier(8)
    def work():
        keep = [bytearray(64 << 10) for _ in range(64)]    # heap allocations from this thread
        barrier.wait()                                     # all 8 alive at once: none reuses
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("capped", capped, flush=True)
    ctypes.CDLL(None).malloc_stats()                       # one "Arena i:" block per arena, on stderr
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and malloc_stats")
@pytest.mark.parametrize("mode,env", [("cap", {}), ("none", {}), ("cap", {"MALLOC_ARENA_MAX": "3"})])
def test_training_processes_cap_malloc_arenas(mode, env):
    """The trainer caps glibc's arenas (``limit_host_malloc_arenas``, called by run_from_config
    before any device exists), so that threads' freed blocks are not stranded in heaps of their
    own; without the cap each new thread gets an arena; a user's MALLOC_ARENA_MAX wins."""
    from dar_jax.train.loop import HOST_MALLOC_ARENAS
    out = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True,
                         timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "", **env})
    assert out.returncode == 0, out.stderr[-2000:]
    count = out.stderr.count("Arena ")
    capped = mode == "cap" and not env
    assert out.stdout.split() == ["capped", str(capped)]
    if capped:
        assert count == HOST_MALLOC_ARENAS, out.stderr
    elif env:
        assert count == 3, out.stderr            # 9 threads that allocate: as many as allowed
    else:
        assert count > 3, out.stderr
