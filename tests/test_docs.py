"""The docs a user reads stay true: README's promises and links, the generated configuration reference,
and every command's --help with examples that parse."""

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from leantrain.cli import build_parser, commands, main
from leantrain.config import REFERENCE_COMMAND, describe, load_config, reference_markdown

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# One page per stage; the README links each one.
STAGE_PAGES = ["data.md", "training.md", "optimizers.md", "performance.md", "fault-tolerance.md", "scaling.md",
               "finetune.md", "energy.md", "plan.md", "report.md", "configuration.md", "api.md", "safety.md"]


def test_configuration_reference_is_current():
    page = (DOCS / "configuration.md").read_text()
    assert page == reference_markdown(), f"docs/configuration.md is stale: run `{REFERENCE_COMMAND}`"
    for key, *_ in describe():  # every field has its row
        assert f"| `{key}` |" in page
    assert len(describe()) > 40


def test_readme_is_short_with_install_and_quick_start():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "## Install" in text and "pip install ." in text
    assert "    make demo" in text and "    make test" in text  # the two-command quick start
    for page in STAGE_PAGES:
        assert f"(docs/{page})" in text, f"README does not link docs/{page}"


def test_readme_lists_every_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", README.read_text(), re.M))
    assert set(extras) <= rows, f"extras missing from README's Install table: {sorted(set(extras) - rows)}"


def test_docs_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    for page in sorted(p.name for p in DOCS.glob("*.md")):
        if page != "index.md":
            assert f"]({page})" in index, f"docs/index.md has no link to {page}"


def _links(path: Path) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", path.read_text()) if not re.match(r"[a-z]+:", m)]


@pytest.mark.parametrize("path", [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for link in _links(path):
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{path.name} links {link!r}: no such file"
        if anchor and file.suffix == ".md":  # GitHub's anchors: headings lowercased, punctuation dropped
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
            assert anchor in slugs, f"{path.name} links {link!r}: no such heading"


def test_every_command_help_has_examples_that_parse(capsys):
    parser = build_parser()
    paths = [path for path, _ in commands(parser)]
    assert {"", "data prepare", "train", "export", "generate", "plan", "report", "config"} <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as stop:
            main([*path.split(), "--help"])
        out = capsys.readouterr().out
        assert stop.value.code == 0 and out.startswith("usage: leantrain"), path
        assert "\nexamples:\n" in out, f"`leantrain {path} --help` shows no example"
        examples = [line.split("  #")[0].strip() for line in out.split("\nexamples:\n", 1)[1].splitlines()]
        examples = [e for e in examples if e.startswith("leantrain ") and "COMMAND" not in e]
        assert examples, path
        for example in examples:  # each example is a command line this parser and the config accept
            argv = shlex.split(example)[1:]
            overrides = [a for a in argv if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]
            parser.parse_args([a for a in argv if a not in overrides])
            load_config(recipe="tiny", overrides=overrides)  # unknown keys and bad values raise
