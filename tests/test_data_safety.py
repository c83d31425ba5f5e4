"""`data prepare` on hostile inputs and interruptions: real FIFOs, devices, symlinks, signals and a full disk.

Every command runs as a real `leantrain data prepare` subprocess with a bounded wait, so a hang
fails the test instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leantrain.corpus.readers import ReadStats, read_paths

WAIT = 120  # seconds a command may take before the test calls it a hang


def prepare(*args: str | Path, timeout: float = WAIT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "leantrain.cli", "data", "prepare", "--executor", "serial", "--vocab-size", "300",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def card(out: Path) -> dict:
    return json.loads((out / "data_card.json").read_text())


def prose(i: int) -> str:
    return f"document {i} says something different: " + " ".join(f"w{i}x{j}" for j in range(100)) + "\n"


def corpus(root: Path, n: int = 4) -> Path:
    d = root / "in"
    d.mkdir()
    for i in range(n):
        (d / f"doc{i}.txt").write_text(prose(i))
    return d


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- special files and symlinks --------------------------------------------------------------

def test_fifo_socket_and_device_inputs_are_skipped_and_counted(tmp_path: Path) -> None:
    import socket

    d = corpus(tmp_path)
    os.mkfifo(d / "pipe.txt")  # an open of this for reading would block forever
    os.symlink("/dev/zero", d / "zeros.txt")  # inside the folder, but a device: never read
    sock = socket.socket(socket.AF_UNIX)
    sock_path = tmp_path / "s.sock"
    sock.bind(str(sock_path))
    try:
        os.symlink(sock_path, d / "sock.txt")
        out = tmp_path / "ds"
        r = prepare(d, "--out", out, "--follow-symlinks")  # even when following links, devices stay unread
    finally:
        sock.close()
    assert r.returncode == 0, r.stderr
    rs = card(out)["sources"]["read_stats"]
    assert rs["special"] == 3 and rs["files"] == 4 and rs["documents"] == 4
    assert "3 FIFOs/devices/sockets" in r.stdout


def test_dev_zero_or_a_fifo_named_directly_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "named.fifo"
    os.mkfifo(fifo)
    r = prepare("/dev/zero", fifo, "--out", tmp_path / "ds")
    assert r.returncode == 2 and "no documents" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ds").exists() and leftovers(tmp_path) == []
    d = corpus(tmp_path)
    r = prepare(d, "/dev/zero", fifo, "--out", tmp_path / "ds")
    assert r.returncode == 0, r.stderr
    assert card(tmp_path / "ds")["sources"]["read_stats"]["special"] == 2


def test_symlinks_are_not_followed_out_of_the_input_folder(tmp_path: Path) -> None:
    d = corpus(tmp_path)
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.txt").write_text("a private note that must not become training data\n")
    (outside / "more.txt").write_text("another private file in a private folder\n")
    os.symlink(outside / "secret.txt", d / "link.txt")
    os.symlink(outside, d / "linked_dir")
    os.symlink(d / "doc0.txt", d / "inside_link.txt")  # stays inside: read (exact dedup then drops the copy)
    os.symlink(tmp_path / "gone.txt", d / "broken.txt")
    os.symlink(d, d / "loop")  # a link back to the folder itself: must not loop

    stats = ReadStats()
    texts = [doc.text for doc in read_paths([d], stats=stats)]
    assert not any("private" in t for t in texts)
    assert stats.symlinks_out == 3 and stats.files == 5  # link.txt, linked_dir, broken.txt; 4 docs + inside link

    out = tmp_path / "ds"
    r = prepare(d, "--out", out)
    assert r.returncode == 0, r.stderr
    c = card(out)
    assert c["sources"]["read_stats"]["symlinks_out"] == 3
    assert {s["name"]: s["dropped"] for s in c["steps"]}["exact_dedup"] == {"dedup:exact": 1}

    stats = ReadStats()
    texts = [doc.text for doc in read_paths([d], stats=stats, follow_symlinks=True)]
    assert sum("private" in t for t in texts) == 3  # secret.txt twice (link and linked_dir) and more.txt
    assert stats.symlinks_out == 1  # only the broken link


def test_per_file_size_limit(tmp_path: Path) -> None:
    d = corpus(tmp_path)
    (d / "huge.txt").write_text("x" * 5000 + "\n")
    out = tmp_path / "ds"
    r = prepare(d, "--out", out, "--max-file-bytes", "4096")
    assert r.returncode == 0, r.stderr
    rs = card(out)["sources"]["read_stats"]
    assert rs["too_large"] == 1 and rs["documents"] == 4


# ---- malformed records ---------------------------------------------------------------------------

def test_jsonl_without_the_text_field_names_the_fields(tmp_path: Path) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"title": f"t{i}", "body": prose(i)}) + "\n" for i in range(5)))
    r = prepare(f, "--out", tmp_path / "ds")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "no string field 'text'" in line and "body, title" in line and "--text-field" in line
    assert not (tmp_path / "ds").exists()
    r = prepare(f, "--out", tmp_path / "ds", "--text-field", "body")
    assert r.returncode == 0, r.stderr
    assert card(tmp_path / "ds")["sources"]["read_stats"]["documents"] == 5


def test_deep_json_invalid_utf8_and_empty_files_are_counted(tmp_path: Path) -> None:
    d = corpus(tmp_path)
    deep = "[" * 200_000 + "]" * 200_000
    (d / "rows.jsonl").write_text(json.dumps({"text": prose(9)}) + "\n" + f'{{"text": {deep}}}\n' + deep + "\n")
    (d / "latin.txt").write_bytes("caf\xe9 au lait, ".encode("latin-1") * 5 + b"\n")
    (d / "empty.txt").write_bytes(b"")
    out = tmp_path / "ds"
    r = prepare(d, "--out", out)
    assert r.returncode == 0, r.stderr
    rs = card(out)["sources"]["read_stats"]
    assert rs["deep_json"] == 2 and rs["bad_json_lines"] == 2 and rs["replaced_utf8"] == 1 and rs["empty"] == 1
    assert rs["documents"] == 6


# ---- dedup by default ------------------------------------------------------------------------

def test_default_prepare_dedups_and_no_dedup_keeps_copies(tmp_path: Path) -> None:
    d = corpus(tmp_path)
    (d / "copy.txt").write_text(prose(0))
    (d / "near.txt").write_text(prose(1).replace("w1x50", "changed"))
    r = prepare(d, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    steps = {s["name"]: s for s in card(tmp_path / "a")["steps"]}
    assert steps["exact_dedup"]["dropped"] == {"dedup:exact": 1}
    assert steps["near_dedup"]["dropped"] == {"dedup:near": 1}
    assert card(tmp_path / "a")["tokens"]["documents"] == 4
    r = prepare(d, "--out", tmp_path / "b", "--no-dedup")
    assert r.returncode == 0, r.stderr
    c = card(tmp_path / "b")
    assert [s["name"] for s in c["steps"]] == ["read"] and c["tokens"]["documents"] == 6


def test_chat_data_goes_through_curation(tmp_path: Path) -> None:
    f = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"question {i}: what is {i} plus {i}?",
             "response": f"answer {i}, mail me at a{i}@corp.example.com"} for i in range(6)]
    rows.append(rows[0])  # a duplicate example
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "chat"
    r = prepare("--format", "chat", f, "--out", out, "--profile", "code")
    assert r.returncode == 0, r.stderr
    c = card(out)
    steps = {s["name"]: s for s in c["steps"]}
    assert steps["exact_dedup"]["dropped"] == {"dedup:exact": 1} and steps["pii"]["modified"]["pii:email"] == 7
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 6
    assert "chat_template" in meta and meta["splits"]["train"]["target_tokens"] > 0
    from leantrain.tokens.dataset import TokenDataset
    from leantrain.tokens.tokenizer import load_tokenizer

    data = TokenDataset(out)
    text = load_tokenizer(out / "tokenizer.json").decode(data.shards("train")[0].tolist())
    assert "<EMAIL>" in text and "corp.example.com" not in text and "\ue000" not in text


# ---- Ctrl-C, SIGTERM and a full disk -----------------------------------------------------------

def _ctrl_c_as_in_a_terminal() -> None:
    """The child starts with Ctrl-C's default action, as a foreground job does, even when this suite was
    started with SIGINT ignored (`make test &` from a script), which the child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(cmd: list[str], ready, sig: int = signal.SIGINT, group: bool = True,
                    tries: int = 4) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; once `ready()` holds, freeze the main process, send `sig` to
    the whole group (as a terminal's Ctrl-C does; `group=False`: to the main process, as `kill` does) and
    let it go on. Retries if the run finished first."""
    for _ in range(tries):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)
        deadline = time.monotonic() + WAIT
        hit = False
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(proc.pid):
                os.kill(proc.pid, signal.SIGSTOP)
                hit = ready(proc.pid)  # still at that point while frozen
                (os.killpg if group else os.kill)(proc.pid, sig)
                os.kill(proc.pid, signal.SIGCONT)
                break
            time.sleep(0.002)
        try:
            out, err = proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        if hit:
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        for p in Path(cmd[cmd.index("--out") + 1]).parent.glob("ds*"):
            import shutil

            shutil.rmtree(p)
    pytest.fail("the run always finished before it could be interrupted")


def _group_size(pgid: int) -> int:
    """Processes in a process group (the prepare, its forkserver and curation workers)."""
    n = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                n += 1
    return n


def _at(parent: Path, pid: int, stage: str) -> bool:
    """Whether the prepare with this pid (writing parent/ds) is at `stage`, judged by its staging files."""
    staging = parent / f".ds.tmp-{pid}"
    if stage == "curating":  # its spill folder is there, and so are a forkserver and 2 workers
        return (parent / f".ds.curate-{pid}").is_dir() and not staging.exists() and _group_size(pid) >= 4
    if stage == "training the tokenizer":
        return staging.is_dir() and not (staging / "tokenizer.json").exists()
    return (staging / "tokenizer.json").is_file() and not (staging / "meta.json").exists()  # encoding


FORKSERVER_CHILD = """
import multiprocessing as mp, signal
from leantrain.corpus.executors import LocalExecutor

def handler(q):
    q.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)

if __name__ == "__main__":
    with LocalExecutor(2) as ex:
        assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]
        ctx = mp.get_context("forkserver")
        q = ctx.Queue()
        p = ctx.Process(target=handler, args=(q,))  # no initializer: what every worker has before its own runs
        p.start()
        print("ignored" if q.get(timeout=60) else "default")
        p.join(60)
"""


@pytest.fixture
def sigint_handler():
    """Set SIGINT's handler for one test and put the suite's back after: a suite started with Ctrl-C ignored
    (`make test &` in a script, where the shell hands its background jobs SIGINT as SIG_IGN) begins with SIG_IGN,
    not Python's handler, so a test must not take the one it finds for granted."""
    before = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_inside_a_worker_start_is_held_until_it_ends(sigint_handler) -> None:
    """A Ctrl-C during `submit` (which may be starting a worker) waits for the start to finish, then raises."""
    from leantrain.corpus.executors import ctrl_c_deferred

    sigint_handler(signal.default_int_handler)
    reached_end = False
    with pytest.raises(KeyboardInterrupt), ctrl_c_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, between bytecodes: held, not raised
        reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored_through_a_worker_start(sigint_handler) -> None:
    """In a process started with Ctrl-C ignored, the Ctrl-C held during a worker start is dropped, not raised."""
    from leantrain.corpus.executors import ctrl_c_deferred

    sigint_handler(signal.SIG_IGN)
    with ctrl_c_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_prepare_started_with_ctrl_c_ignored_runs_through_one(tmp_path: Path) -> None:
    """`leantrain data prepare &` in a script ignores the terminal's Ctrl-C, as any background job there does."""
    out = tmp_path / "ds"
    ignoring = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "os.execv(sys.executable, [sys.executable, '-m', 'leantrain.cli', *sys.argv[1:]])")
    cmd = [sys.executable, "-c", ignoring, "data", "prepare", "--builtin", "stdlib", "--profile", "code",
           "--workers", "2", "--vocab-size", "1000", "--out", str(out)]
    r = _interrupt_when(cmd, lambda pid: _at(tmp_path, pid, "encoding"))
    assert r.returncode == 0, r.stderr
    assert "interrupted" not in r.stderr and (out / "meta.json").is_file() and leftovers(tmp_path) == []


def test_curation_workers_ignore_ctrl_c_from_birth(tmp_path: Path) -> None:
    """A Ctrl-C that lands while a worker starts must not print its KeyboardInterrupt traceback: the forkserver
    starts with SIGINT ignored, so its children do too, before the pool's initializer runs."""
    script = tmp_path / "child.py"
    script.write_text(FORKSERVER_CHILD)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ignored"


@pytest.mark.parametrize("stage", ["curating", "training the tokenizer", "encoding"])
def test_ctrl_c_stops_cleans_up_and_says_what_to_rerun(tmp_path: Path, stage: str) -> None:
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "leantrain.cli", "data", "prepare", "--builtin", "stdlib", "--profile", "code",
           "--workers", "2", "--vocab-size", "1000", "--out", str(out)]
    r = _interrupt_when(cmd, lambda pid: _at(tmp_path, pid, stage))
    assert r.returncode == 130, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "run the same command again" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_sigterm_during_prepare_removes_the_staging(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "leantrain.cli", "data", "prepare", "--builtin", "stdlib", "--profile", "code",
           "--workers", "2", "--vocab-size", "1000", "--out", str(out)]
    r = _interrupt_when(cmd, lambda pid: _at(tmp_path, pid, "encoding"), sig=signal.SIGTERM, group=False)
    assert r.returncode in (143, -signal.SIGTERM) and "Traceback" not in r.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_stale_staging_of_a_killed_prepare_is_removed(tmp_path: Path) -> None:
    d = corpus(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for tag in ("tmp", "curate"):
        stale = tmp_path / f".ds.{tag}-{dead.pid}"
        stale.mkdir()
        (stale / "000000.bin").write_bytes(b"half")
    r = prepare(d, "--out", tmp_path / "ds")
    assert r.returncode == 0, r.stderr
    assert leftovers(tmp_path) == [] and "left next to" in r.stderr


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 1 MiB tmpfs: a disk that really fills up (needs root and a kernel that allows the mount)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("fills", ["spill", "shards"])
def test_full_disk_stops_with_a_message_and_removes_partial_output(tiny_disk: Path, tmp_path: Path,
                                                                  fills: str) -> None:
    out = tiny_disk / "ds"
    if fills == "spill":  # 12 MB of curated text: the spill file fills the disk
        r = prepare("--builtin", "stdlib", "--out", out, "--no-dedup")
    else:  # ~0.7 MB of text fits as a spill; the spill plus the token shards do not
        d = tmp_path / "in"
        d.mkdir()
        (d / "rows.jsonl").write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(1000)))
        r = prepare(d, "--out", out, "--no-dedup")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "no space left" in line and "run the same command again" in line
    assert list(tiny_disk.iterdir()) == []  # neither the dataset nor any spill or staging folder
