"""Symbolic checks of generated documents, pluggable per kind of data, each a curation step.

A `Check` looks at a batch of texts and says, for each, None (passes) or why it fails; `CheckStep` makes one a
`GlobalStep` of the curation pipeline, so a rejected candidate is counted and shown in the data card like any
document a filter dropped (reason `check:NAME`). Checks run in batches because some call a program once per
batch (ruff over a folder of files) instead of once per document.

Generated code is never executed in this process: `python` parses with `ast` and compiles with `compile()`
(no code object is run), `ruff` lints files in a temporary folder, and `exec` (opt-in) runs each file in
`sandbox.run_isolated`: a separate interpreter with no network, a time and memory limit and its own
temporary folder.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from leantrain.corpus.readers import Document
from leantrain.corpus.steps import Drop, Executor, GlobalStep, StepStats
from leantrain.errors import ConfigError, LeantrainError

KINDS = ("python", "json", "text")
BATCH = 256
_DETAIL = 160


class Check:
    """A rule over texts. `verdicts(texts)` gives None for a text that passes, else a short reason."""

    name = "check"

    def verdicts(self, texts: list[str]) -> list[str | None]:
        return [self.verdict(t) for t in texts]

    def verdict(self, text: str) -> str | None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class NonEmpty(Check):
    name = "non_empty"

    def verdict(self, text: str) -> str | None:
        return None if text.strip() else "no text beyond the prompt"


class PythonSyntax(Check):
    """Parses (`ast.parse`) and compiles (`compile`, which catches what the parser lets through, e.g. a
    `return` outside a function); the code object is dropped, never run."""

    name = "python_syntax"

    def verdict(self, text: str) -> str | None:
        try:
            with warnings.catch_warnings():  # "invalid escape sequence" and the like: noise, not a verdict
                warnings.simplefilter("ignore")
                tree = ast.parse(text)
                compile(tree, "<synthetic>", "exec", dont_inherit=True)
        except SyntaxError as e:
            return f"line {e.lineno}: {e.msg}"
        except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
            return f"{type(e).__name__}: {str(e)[:_DETAIL]}"
        return None


def ruff_binary() -> str | None:
    """The ruff executable: the `ruff` Python package's own, else one on PATH."""
    try:
        from ruff.__main__ import find_ruff_bin

        return str(find_ruff_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("ruff")


class RuffCheck(Check):
    """`ruff check` finds no error: pyflakes (F) and pycodestyle's error rules (E4, E7, E9), ruff's long-standing
    default selection, named here so that a newer ruff's defaults do not move the bar; any user config is
    ignored. One ruff process per batch."""

    name = "ruff"

    def __init__(self, select: str | None = "E4,E7,E9,F", timeout: float = 120.0) -> None:
        self.binary = ruff_binary()
        if self.binary is None:
            raise ConfigError("--ruff needs ruff: pip install ruff (or drop --ruff)")
        self.select, self.timeout = select, timeout

    def verdicts(self, texts: list[str]) -> list[str | None]:
        with tempfile.TemporaryDirectory(prefix="leantrain-ruff-") as tmp:
            names = []
            for i, t in enumerate(texts):
                name = f"doc_{i:06d}.py"
                (Path(tmp) / name).write_text(t, encoding="utf-8", errors="surrogatepass")
                names.append(name)
            cmd = [self.binary, "check", "--isolated", "--no-cache", "--output-format", "json", "--exit-zero",
                   *(["--select", self.select] if self.select else []), "."]
            try:
                r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise LeantrainError(f"ruff took over {self.timeout:.0f} s on {len(texts)} files; "
                                     "drop --ruff or lower --count") from None
            if r.returncode != 0:
                raise LeantrainError(f"ruff failed (exit {r.returncode}): {r.stderr.strip()[:200]}; "
                                     "reinstall it or drop --ruff")
            found: dict[str, list[str]] = {}
            for item in json.loads(r.stdout or "[]"):
                found.setdefault(Path(item["filename"]).name, []).append(
                    f"{item.get('code') or 'E'} {item.get('message', '')}".strip())
        return [None if n not in found else "; ".join(found[n][:3])[:_DETAIL] for n in names]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "select": self.select or "ruff defaults"}


class ExecCheck(Check):
    """Runs each program in `sandbox.run_isolated` (no network, time and memory limits, a temporary folder);
    passes when it exits 0. Opt-in: the only check that runs generated code, and never in this process."""

    name = "exec"

    def __init__(self, timeout: float = 5.0, memory_mb: int = 512) -> None:
        from leantrain.synth.sandbox import check_isolation

        check_isolation()
        self.timeout, self.memory_mb = timeout, memory_mb

    def verdict(self, text: str) -> str | None:
        from leantrain.synth.sandbox import run_isolated

        return run_isolated(text, timeout=self.timeout, memory_mb=self.memory_mb)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "timeout_s": self.timeout, "memory_mb": self.memory_mb, "network": "none"}


class JsonParse(Check):
    """The whole text is one JSON value (surrounding whitespace aside)."""

    name = "json_parse"

    def verdict(self, text: str) -> str | None:
        try:
            json.loads(text)
        except (ValueError, RecursionError) as e:
            return str(e)[:_DETAIL]
        return None


def json_validator(schema_text: str, flag: str = "--json-schema") -> Any:
    """A jsonschema validator for `schema_text`, or a one-line ConfigError (not JSON, not a valid schema)."""
    try:
        import jsonschema
    except ImportError:
        raise ConfigError(f"{flag} checks need jsonschema: pip install 'leantrain[constrain]'") from None
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag}: the schema is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                          "fix the file") from None
    if not isinstance(schema, dict | bool):
        raise ConfigError(f"{flag}: a schema is a JSON object, not {type(schema).__name__}; fix the file")
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(map(str, e.path)) or "top level"
        raise ConfigError(f"{flag} does not compile: {e.message[:_DETAIL]} (at {where}); fix the file") from None
    return cls(schema)


class JsonSchemaCheck(Check):
    """Parses and is valid under the JSON schema (jsonschema, the draft the schema names)."""

    name = "json_schema"

    def __init__(self, schema_text: str) -> None:
        self.schema_text = schema_text
        self.validator = json_validator(schema_text)

    def verdict(self, text: str) -> str | None:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return "not JSON"
        error = next(iter(self.validator.iter_errors(value)), None)
        if error is None:
            return None
        where = "/".join(map(str, error.path)) or "top level"
        return f"{error.message[:_DETAIL]} (at {where})"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "schema": json.loads(self.schema_text)}


class RegexCheck(Check):
    """The whole text matches the regular expression (`re.fullmatch`)."""

    name = "regex"

    def __init__(self, pattern: str) -> None:
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"--regex does not compile: {e}; fix the expression") from None
        self.pattern = pattern

    def verdict(self, text: str) -> str | None:
        return None if self.regex.fullmatch(text) else f"does not match {self.pattern[:80]!r}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "pattern": self.pattern}


class GrammarCheck(Check):
    """The whole text is a sentence of the EBNF grammar (xgrammar's GBNF dialect, start rule `root`), checked
    character by character with xgrammar's matcher, independent of any tokenizer."""

    name = "grammar"

    def __init__(self, source: str) -> None:
        try:
            import xgrammar as xgr
        except ImportError:
            raise ConfigError("--grammar needs xgrammar: pip install 'leantrain[constrain]'") from None
        self.source = source
        compiler = xgr.GrammarCompiler(xgr.TokenizerInfo([]), max_threads=1, cache_enabled=False)
        try:
            self.compiled = compiler.compile_grammar(source)
        except (RuntimeError, ValueError) as e:
            text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", " ".join(str(e).split())).rstrip(".")
            raise ConfigError(f"--grammar does not compile: {text}; fix the file") from None
        self._xgr = xgr

    def verdict(self, text: str) -> str | None:
        m = self._xgr.GrammarMatcher(self.compiled, terminate_without_stop_token=True)
        if not text or not m.accept_string(text):
            return "not a sentence of the grammar"
        return None if m.is_completed() else "an unfinished sentence of the grammar"

    def __getstate__(self) -> dict[str, Any]:  # compiled grammars do not pickle: recompile in a worker
        return {"source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "grammar": self.source}


def checks_for(kind: str, *, json_schema: str | None = None, regex: str | None = None, grammar: str | None = None,
               ruff: bool = False, exec_check: bool = False, exec_timeout: float = 5.0,
               exec_memory_mb: int = 512) -> list[Check]:
    """The checks of a kind of data, in the order they run (cheap first); raises ConfigError for a rule that
    does not compile or does not fit the kind."""
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r} is not allowed; choose one of {', '.join(KINDS)}")
    if kind != "python" and (ruff or exec_check):
        raise ConfigError(f"--{'ruff' if ruff else 'exec-check'} checks Python; it does not apply to --kind {kind}")
    if json_schema is not None and kind != "json":
        raise ConfigError(f"--json-schema describes JSON documents; use it with --kind json, not --kind {kind}")
    checks: list[Check] = [NonEmpty()]
    if kind == "python":
        checks.append(PythonSyntax())
        if ruff:
            checks.append(RuffCheck())
        if exec_check:
            checks.append(ExecCheck(exec_timeout, exec_memory_mb))
    elif kind == "json":
        checks.append(JsonParse())
        if json_schema is not None:
            checks.append(JsonSchemaCheck(json_schema))
    if regex is not None:
        checks.append(RegexCheck(regex))
    if grammar is not None:
        checks.append(GrammarCheck(grammar))
    return checks


class CheckStep(GlobalStep):
    """A `Check` as a curation step: drops what fails with reason `check:NAME`, in batches of BATCH."""

    def __init__(self, check: Check) -> None:
        self.check = check
        self.name = f"check:{check.name}"
        self.failed: dict[str, str] = {}  # document id -> why, for OUT/rejected.jsonl

    def run(self, docs: Iterable[Document], stats: StepStats, executor: Executor) -> Iterator[Document]:
        batch: list[Document] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= BATCH:
                yield from self._judge(batch, stats)
                batch = []
        if batch:
            yield from self._judge(batch, stats)

    def _judge(self, batch: list[Document], stats: StepStats) -> Iterator[Document]:
        for doc, why in zip(batch, self.check.verdicts([d.text for d in batch]), strict=True):
            if why is None:
                yield doc
            else:
                self.failed[doc.id] = why
                stats.drop(doc, Drop(self.name, why))

    def report(self) -> dict[str, Any]:
        return {}  # the checks' settings go to the card's synthetic section, not among the duplicates
