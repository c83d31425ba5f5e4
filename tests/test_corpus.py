"""Readers: real files on disk, the real standard library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leantrain.corpus.readers import Document, ReadStats, read_builtin, read_paths
from leantrain.errors import DataError


def _corpus(root: Path) -> Path:
    """A folder with every kind of input a reader must handle, created in reverse order on purpose."""
    d = root / "data"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / ".hidden.txt").write_text("secret\n")
    (d / "z_empty.txt").write_bytes(b"")
    (d / "y_blank.md").write_text("  \n\n")
    (d / "x_image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR" + bytes(range(256)))
    lines = [
        json.dumps({"text": "first line doc", "id": 1}),
        "{not json",
        json.dumps({"content": "no text field"}),
        "",
        json.dumps({"text": 42}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "second line doc ✓"}),
        json.dumps({"text": ""}),
    ]
    (d / "sub" / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (d / "sub" / "code.py").write_text("def f():\n    return 1\n")
    (d / "b.md").write_text("# Title\n\nbody\n")
    (d / "a.txt").write_text("hello world\n")
    return d


def test_read_paths_kinds_order_and_skips(tmp_path: Path) -> None:
    d = _corpus(tmp_path)
    stats = ReadStats()
    docs = list(read_paths([d], stats=stats))
    assert [x.id for x in docs] == [
        "data/a.txt", "data/b.md", "data/sub/code.py", "data/sub/rows.jsonl#L1", "data/sub/rows.jsonl#L7",
    ]
    assert docs[0] == Document(id="data/a.txt", text="hello world\n", source=str(d / "a.txt"))
    assert docs[3].text == "first line doc" and docs[4].text == "second line doc ✓"
    assert (stats.binary, stats.empty, stats.bad_json_lines) == (1, 3, 4)  # empty: 2 files + 1 jsonl text
    assert stats.documents == 5 and stats.files == 7 and stats.hidden == 2
    assert "skipped 1 binary, 3 empty, 4 bad json lines, 2 hidden" in stats.summary()


def test_read_paths_text_field_and_direct_file(tmp_path: Path) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"body": "B1", "text": "T1"}) + "\n" + json.dumps({"text": "T2"}) + "\n")
    stats = ReadStats()
    docs = list(read_paths([str(f)], text_field="body", stats=stats))
    assert [(x.id, x.text) for x in docs] == [("rows.jsonl#L1", "B1")]
    assert stats.bad_json_lines == 1


def test_all_bad_jsonl_is_not_a_crash(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text("nope\n{\n[1, 2\n")
    stats = ReadStats()
    assert list(read_paths([f], stats=stats)) == []
    assert stats.bad_json_lines == 3


def test_invalid_utf8_is_replaced_and_bom_dropped(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1") + b"\n")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfbom text")
    stats = ReadStats()
    docs = {x.id: x.text for x in read_paths([tmp_path], stats=stats)}
    name = tmp_path.name
    assert docs[f"{name}/latin.txt"] == "caf\ufffd\n"
    assert docs[f"{name}/bom.txt"] == "bom text"
    assert stats.replaced_utf8 == 1


def test_missing_path_fails_at_call_time(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_paths([tmp_path / "nope"])  # no iteration: the error must come before any work


def test_sorted_order_is_by_relative_path(tmp_path: Path) -> None:
    names = ["b/2.txt", "a.txt", "b/1.txt", "B.txt", "a/z.txt"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text(n)
    ids = [x.id.split("/", 1)[1] for x in read_paths([tmp_path])]
    assert ids == sorted(names)


def test_read_builtin_stdlib_is_deterministic_and_excludes_tests() -> None:
    stats = ReadStats()
    first = [(d.id, len(d.text)) for d in read_builtin("stdlib", stats=stats)]
    ids = [i for i, _ in first]
    assert len(ids) > 500
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert "json/decoder.py" in ids and "os.py" in ids
    for i in ids:
        parts = i.split("/")
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts[:-1]), i
        assert i.endswith(".py")
    assert 5_000_000 < stats.bytes < 40_000_000  # ~12 MB without the test suites
    assert [(d.id, len(d.text)) for d in read_builtin()] == first


def test_read_builtin_unknown_name() -> None:
    with pytest.raises(DataError, match="stdlib"):
        read_builtin("wikipedia")
