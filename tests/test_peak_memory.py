"""Peak memory is the run's own, not its parent's (ru_maxrss survives exec on Linux)."""

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_rss_of_a_child_does_not_include_a_big_parent():
    big = bytearray(600 * 2**20)
    for i in range(0, len(big), 4096):  # touch every page so the parent's resident set really is big
        big[i] = 1
    code = ("import torch; from leantrain.train.observers import peak_memory_bytes; "
            "print(peak_memory_bytes(torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout) < 550 * 2**20  # torch's runtime is ~200-350 MB; the parent holds 600 MB more
    del big
