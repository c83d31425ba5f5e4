"""Running a generated program somewhere it can do little harm: never in leantrain's own process.

Each program runs in a fresh `python -I` (isolated mode: no user site, no PYTHON* variables) started through
`unshare --user --net` (a new network namespace holds only a loopback that is down: no network at all),
with a minimal environment, its working folder a new temporary folder that is removed afterwards, and
limits set by a small launcher before the program's first line: address space (memory), CPU seconds,
file size and open files; a wall-clock timeout kills its whole process group. Without unprivileged
user namespaces there is no network isolation, and the check refuses to run rather than run without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from leantrain.errors import ConfigError

# Sets the limits, then runs the program as __main__; the launcher is the child's first code.
_LAUNCHER = """\
import resource, runpy, sys
mem, cpu = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first: named as a time-out
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
sys.argv = [sys.argv[3]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _unshare() -> str | None:
    return shutil.which("unshare")


@cache
def _isolation_error() -> str | None:
    """None when a child can be put in its own network namespace here, else why not."""
    binary = _unshare()
    if binary is None:
        return "the `unshare` program (util-linux) is not installed"
    try:
        r = subprocess.run([binary, "--user", "--net", sys.executable, "-I", "-c", "pass"], capture_output=True,
                           text=True, timeout=30, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare did not start ({e})"
    return None if r.returncode == 0 else f"unshare --user --net failed: {r.stderr.strip()[:120]}"


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def check_isolation() -> None:
    """Refuse the execution check where programs could not be cut off from the network."""
    why = _isolation_error()
    if why is not None:
        raise ConfigError(f"--exec-check runs programs without network, but {why}; allow unprivileged user "
                          "namespaces (sysctl kernel.unprivileged_userns_clone=1) or drop --exec-check")


def run_isolated(source: str, *, timeout: float = 5.0, memory_mb: int = 512) -> str | None:
    """Run `source` as a Python program in the sandbox; None when it exits 0, else why it failed."""
    check_isolation()
    with tempfile.TemporaryDirectory(prefix="leantrain-exec-") as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(source, encoding="utf-8", errors="surrogatepass")
        cmd = [_unshare() or "unshare", "--user", "--net", sys.executable, "-I", "-c", _LAUNCHER,
               str(memory_mb << 20), str(max(1, int(timeout))), str(program)]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            return f"ran over {timeout:g} s"
        except BaseException:  # Ctrl-C: the child's group goes too
            _kill_group(proc.pid)
            proc.wait()
            raise
        _kill_group(proc.pid)  # anything the program left running in the background
        if proc.returncode == 0:
            return None
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        if proc.returncode == -signal.SIGXCPU:
            return f"ran over {timeout:g} s of CPU"
        if proc.returncode < 0:
            return f"killed by signal {-proc.returncode} (limits: {timeout:g} s, {memory_mb} MB)"
        return last[0][:160]
