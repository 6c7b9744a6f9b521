"""Every command line the documentation shows is true.

Collected from README.md and the model card (fenced shell blocks, indented code blocks and
inline code), from every docstring of ``mfv/**/*.py``, ``train.py``, ``evaluate.py`` and
``benchmarks/*.py`` (literal blocks and inline code), and from the comments of
``configs/*.yaml``. Each ``python X.py`` / ``python -m M`` / ``mfv SUB`` line must name a
script, module or sub-command that exists, and each of its ``--flags`` must appear in that
command's ``--help`` (a dotted option of a nested class or dataclass through its section's
``--P.help``); a ``--config``/``--configs`` file must exist. ``make T VAR=V`` lines must name a
Makefile target and variable. Options shown without a command (``--model.lr 0.01``) must be
options of one of the documented commands. Nothing is run but ``--help``.

The ``--help`` calls share one Python process (the imports are paid once), started with
``sys.executable`` and asked one command at a time; each command's help is fetched once.
"""

from __future__ import annotations

import ast
import json
import os
import re
import select
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Documented command lines known to be wrong, in files this test's author does not own:
# (file, command as collected). Fix the documentation, then delete the entry here; an entry
# that has become true fails the test, so the list cannot go stale.
KNOWN_WRONG: set[tuple[str, str]] = set()

# Tools that are not this project's: their lines are documentation of someone else's CLI.
EXTERNAL = {"tensorboard", "huggingface-cli", "pip", "nvidia-smi", "git", "pytest"}
# Options of someone else's tool the prose mentions (pip's, in the set-up notes).
NOT_OUR_OPTIONS = {"--no-deps"}
# What a documented command line starts with (after ``$ ``, ``time`` and ``VAR=value``).
_START = re.compile(r"^(?:\$\s+)?(?:time\s+)?(?:[A-Z_]+=\S+\s+)*"
                    r"(python3?|\.venv/bin/python|mfv|make|train\.py|evaluate\.py)(?:\s|$)")
# ``mfv`` sub-commands the README also shows without ``mfv`` (``prepare-gqa --split ...``).
MFV_SUBCOMMANDS_ALONE = ("prepare-gqa", "prepare-data", "generate-synthetic", "train-organism")
# A placeholder value (DIR, RUN/..., FILE, X): nothing to check on disk.
_PLACEHOLDER = re.compile(r"(^|/)[A-Z][A-Z_]*(\.\w+)?(/|$)")
HELP_TIMEOUT_S = 120


@dataclass(frozen=True)
class Documented:
    """One command line as the documentation shows it.

    Attributes:
        file: Path relative to the repository.
        line: Line number in ``file`` where the command starts.
        text: The command, continuation lines joined and whitespace collapsed.
    """

    file: str
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}:{self.text[:60]}"


# --------------------------------------------------------------------------- collection


def _is_command(text: str) -> bool:
    return bool(_START.match(text)) or text.startswith(tuple(f"{sub} --" for sub in MFV_SUBCOMMANDS_ALONE))


def _collapse(text: str) -> str:
    """One line: continuations joined, whitespace collapsed, a trailing ``# comment`` dropped."""
    return re.sub(r"\s+#(\s.*)?$", "", " ".join(text.replace("\\\n", " ").split()))


def _dedent(text: str) -> str:
    """A docstring without its source indentation (line numbers kept, unlike ``inspect.cleandoc``)."""
    lines = text.split("\n")
    margin = min((len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()), default=0)
    return "\n".join([lines[0], *(line[margin:] for line in lines[1:])])


def _literal_lines(text: str, first_line: int, indented_only: bool) -> list[tuple[int, str]]:
    """Command lines of a block of text, with ``\\`` continuations joined."""
    found, lines, index = [], text.split("\n"), 0
    while index < len(lines):
        raw = lines[index]
        start = index
        while raw.rstrip().endswith("\\") and index + 1 < len(lines):
            index += 1
            raw = raw.rstrip()[:-1] + " " + lines[index].strip()
        index += 1
        if indented_only and not raw.startswith((" ", "\t")):
            continue
        stripped = raw.strip()
        if _is_command(stripped):
            found.append((first_line + start, _collapse(stripped)))
    return found


def _is_option_fragment(text: str) -> bool:
    """Inline code that shows options without their command (``--model.lr 0.01``)."""
    return re.match(r"--[a-z]", text) is not None


def _inline_spans(text: str, first_line: int, pattern: str, fragments: bool = False) -> list[tuple[int, str]]:
    """Inline code spans (which may wrap over lines) that hold a command (or, with
    ``fragments``, options shown without their command)."""
    found = []
    for match in re.finditer(pattern, text, re.S):
        span = _collapse(match.group(1))
        if (_is_option_fragment(span) if fragments else _is_command(span)):
            found.append((first_line + text[: match.start()].count("\n"), span))
    return found


MARKDOWN = ("README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")),
            "checkpoints/organism/README.md")  # the README, docs/ and the model card


def _from_markdown(name: str, fragments: bool = False) -> list[Documented]:
    text = (REPO / name).read_text()
    fence = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    # Prose: the fences blanked out, keeping the line numbers.
    prose = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    inline = r"(?<!`)`([^`]+)`(?!`)"
    if fragments:
        return [Documented(name, line, span) for line, span in _inline_spans(prose, 1, inline, fragments=True)]
    found: list[tuple[int, str]] = []
    for match in fence.finditer(text):
        if match.group(1) in ("bash", "sh", "shell", "console", ""):
            found += _literal_lines(match.group(2), text[: match.start(2)].count("\n") + 1, indented_only=False)
    # Indented code blocks (4 spaces, also inside list items) and inline code.
    indented = "\n".join(line if line.startswith("    ") else "" for line in prose.split("\n"))
    found += _literal_lines(indented, 1, indented_only=True)
    found += _inline_spans(prose, 1, inline)
    return [Documented(name, line, command) for line, command in found]


def _docstrings(path: Path) -> list[tuple[int, str]]:
    """``(first line, text)`` of every module, class and function docstring of a file."""
    tree = ast.parse(path.read_text())
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                   ast.AsyncFunctionDef))]
    found = []
    for node in nodes:
        body = getattr(node, "body", [])
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            found.append((body[0].value.lineno, _dedent(body[0].value.value)))
    return found


def _from_python(fragments: bool = False) -> list[Documented]:
    files = sorted((REPO / "mfv").rglob("*.py")) + [REPO / "train.py", REPO / "evaluate.py"]
    files += sorted((REPO / "benchmarks").glob("*.py"))
    documented = []
    for path in files:
        for first, text in _docstrings(path):
            if fragments:
                found = _inline_spans(text, first, r"``(.+?)``", fragments=True)
            else:
                # Literal blocks are indented within the docstring; prose lines are not.
                found = _literal_lines(text, first, indented_only=True)
                found += _inline_spans(text, first, r"``(.+?)``")
            rel = str(path.relative_to(REPO))
            documented += [Documented(rel, line, command) for line, command in found]
    return documented


def _from_configs() -> list[Documented]:
    documented = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        comments = []
        for line in path.read_text().split("\n"):
            # Whole-line comments and trailing ones (``key: value  # ...``).
            match = re.match(r"^\s*#(.*)$", line) or re.match(r"^[^#]*\s#(.*)$", line)
            comments.append(match.group(1) if match else "")
        text = "\n".join(comments)
        rel = str(path.relative_to(REPO))
        documented += [Documented(rel, line, command)
                       for line, command in _literal_lines(text, 1, indented_only=False)]
    return documented


def collect(fragments: bool = False) -> list[Documented]:
    """Every documented command line (or option fragment), once per (file, text)."""
    seen, unique = set(), []
    found = [item for name in MARKDOWN for item in _from_markdown(name, fragments)]
    found += _from_python(fragments) + ([] if fragments else _from_configs())
    for item in found:
        if (item.file, item.text) not in seen:
            seen.add((item.file, item.text))
            unique.append(item)
    return unique


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Parsed:
    """A command line taken apart.

    Attributes:
        kind: ``mfv``, ``script``, ``module``, ``make`` or ``external``.
        program: The argv that runs the command, without its options (``["mfv", "train"]``,
            ``["script", "train.py"]``, ``["module", "mfv.data.gqa", "prepare"]``, ...).
        flags: ``(flag, value or None)`` for each ``--flag``.
        words: Every token after the program (make targets and variables).
    """

    kind: str
    program: tuple[str, ...]
    flags: tuple[tuple[str, str | None], ...]
    words: tuple[str, ...]


def _tokens(text: str) -> list[str]:
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:  # an apostrophe in prose after the command
        tokens = text.split(" #")[0].split()
    while tokens and (tokens[0] in ("$", "time") or re.fullmatch(r"[A-Z_]+=\S*", tokens[0])):
        tokens.pop(0)
    return tokens


def _flags(tokens: list[str]) -> tuple[tuple[str, str | None], ...]:
    flags = []
    for index, token in enumerate(tokens):
        token = token.lstrip("[(").rstrip("]),;:.")
        if not token.startswith("--") or len(token) < 3:
            continue
        name, _, value = token.partition("=")
        if not value and index + 1 < len(tokens) and not tokens[index + 1].lstrip("[(").startswith("-"):
            value = tokens[index + 1]
        flags.append((name, value or None))
    return tuple(flags)


def parse(text: str) -> Parsed:
    tokens = _tokens(text)
    head, rest = tokens[0], tokens[1:]
    if head == "make":
        return Parsed("make", ("make",), (), tuple(rest))
    if head in ("train.py", "evaluate.py"):
        return Parsed("script", ("script", head), _flags(rest), tuple(rest))
    if head in MFV_SUBCOMMANDS_ALONE:
        head, rest = "mfv", tokens
    if head == "mfv":
        # ``mfv <command> [options]`` names no command: only ``mfv --help`` is checked.
        sub = rest[:1] if rest and re.fullmatch(r"[a-z][a-z\-]*", rest[0]) else []
        return Parsed("mfv", ("mfv", *sub), _flags(rest[len(sub):]), tuple(rest))
    # python ...
    if rest[:1] == ["-m"]:
        module, rest = rest[1], rest[2:]
        if module.split(".")[0] in EXTERNAL:
            return Parsed("external", (module,), (), tuple(rest))
        positional = []  # a sub-command word (``mfv.data.gqa prepare``), not ``[--out DIR]`` or ``...``
        while rest and re.fullmatch(r"[a-z][\w\-]*", rest[0]):
            positional.append(rest.pop(0))
        return Parsed("module", ("module", module, *positional), _flags(rest), tuple(rest))
    if rest and rest[0].endswith(".py"):
        return Parsed("script", ("script", rest[0]), _flags(rest[1:]), tuple(rest[1:]))
    return Parsed("external", (head,), (), tuple(rest))


# --------------------------------------------------------------------------- --help, once each

_RUNNER = r'''
import contextlib, io, json, os, runpy, sys, traceback
protocol = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray writes to fd 1 must not reach the protocol
while True:
    request = sys.stdin.readline()
    if not request:
        break
    kind, target, *args = json.loads(request)
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_argv, saved_path = list(sys.argv), list(sys.path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if kind == "mfv":
                from mfv.cli import main
                main([target, *args] if target else args)
            elif kind == "script":
                sys.argv = [target, *args]
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
            else:
                sys.argv = [target, *args]
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        code, err = 1, io.StringIO(err.getvalue() + traceback.format_exc())
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    protocol.write(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue()[-4000:]}) + "\n")
    protocol.flush()
'''


class HelpServer:
    """One child Python process that answers ``--help`` requests, one JSON line each."""

    def __init__(self) -> None:
        env = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
        self._log = tempfile.TemporaryFile("w+")  # the child's own stderr, shown if it dies
        self._process = subprocess.Popen([sys.executable, "-c", _RUNNER], cwd=REPO, env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._cache: dict[tuple[str, ...], dict] = {}

    def help(self, program: tuple[str, ...], *extra: str) -> dict:
        """``{"code", "out", "err"}`` of ``program *extra --help``."""
        request = (*program, *extra, "--help")
        if request not in self._cache:
            kind, *rest = program
            # mfv's --help is short; "--help full" lists every option (the tree the docs may name).
            argv = [kind, rest[0] if rest else "", *rest[1:], *extra, "--help", *(["full"] if kind in ("mfv", "script") else [])]
            self._process.stdin.write(json.dumps(argv) + "\n")
            self._process.stdin.flush()
            ready, _, _ = select.select([self._process.stdout], [], [], HELP_TIMEOUT_S)
            if not ready:
                raise TimeoutError(f"{' '.join(request)} gave no answer in {HELP_TIMEOUT_S} s")
            line = self._process.stdout.readline()
            if not line:
                self._log.seek(0)
                raise RuntimeError(f"the --help process died on {' '.join(request)}: {self._log.read()[-2000:]}")
            self._cache[request] = json.loads(line)
        return self._cache[request]

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def helps():
    server = HelpServer()
    yield server
    server.close()


# --------------------------------------------------------------------------- checks


@lru_cache(maxsize=None)
def _makefile() -> tuple[set[str], set[str]]:
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.\-]+)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:+]?=", text, re.M))
    return targets, variables


def _check_make(parsed: Parsed) -> list[str]:
    targets, variables = _makefile()
    problems = []
    for word in parsed.words:
        if word.startswith("-"):
            continue
        name, assigned, _ = word.partition("=")
        if assigned and name not in variables:
            problems.append(f"Makefile has no variable {name}")
        elif not assigned and name not in targets:
            problems.append(f"Makefile has no target {name!r}")
    return problems


def _values(value: str) -> list[str]:
    return [v.strip() for v in value.strip("[]").split(",") if v.strip()]


def _config_files(parsed: Parsed) -> list[str]:
    return [v for flag, value in parsed.flags if flag in ("--config", "--configs") and value
            for v in _values(value)]


def _check_files(parsed: Parsed) -> list[str]:
    problems = []
    if parsed.kind == "script" and not (REPO / parsed.program[1]).is_file():
        problems.append(f"no script {parsed.program[1]}")
    for path in _config_files(parsed):
        if not _PLACEHOLDER.search(path) and path.endswith((".yaml", ".yml", ".json")) and \
                not (REPO / path).is_file():
            problems.append(f"config file {path} does not exist")
    return problems


def _mentions(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w.\-]){re.escape(flag)}(?![\w\-]|\.\w)", help_text) is not None


def _class_of(parsed: Parsed, section: str) -> str | None:
    """The class a section is set to on the command line or in its config files."""
    for flag, value in parsed.flags:
        if flag == f"--{section}" and value and not value.endswith((".yaml", ".yml")):
            return value
    for path in _config_files(parsed):
        if (REPO / path).is_file():
            config = yaml.safe_load((REPO / path).read_text()) or {}
            node = config.get(section)
            if isinstance(node, dict) and "class_path" in node:
                return node["class_path"]
    return None


def _flag_known(helps: HelpServer, parsed: Parsed, flag: str, top: str) -> bool:
    wildcard = re.match(r"(--[\w.\-]+?)\.?(\*|<\w+>)$", flag)  # ``--settings.*``, ``--settings.<name>``
    if wildcard:
        return re.search(rf"(?<![\w.\-]){re.escape(wildcard.group(1))}\.\w", top) is not None
    if _mentions(top, flag):
        return True
    # A dotted option of a nested class or dataclass is listed by its section's --P.help.
    parts = flag[2:].split(".")
    for cut in range(len(parts) - 1, 0, -1):
        section = ".".join(parts[:cut])
        if not _mentions(top, f"--{section}.help"):
            continue
        cls = _class_of(parsed, section)
        nested = helps.help(parsed.program, f"--{section}.help", *([cls] if cls else []))["out"]
        short = flag.replace(f"--{section}.init_args.", f"--{section}.")
        full = flag if ".init_args." in flag else flag.replace(f"--{section}.", f"--{section}.init_args.", 1)
        return any(_mentions(nested, f) for f in (flag, short, full))
    return False


def _check_flags(helps: HelpServer, parsed: Parsed) -> list[str]:
    answer = helps.help(parsed.program)
    name = " ".join(parsed.program[1:]) if parsed.kind != "mfv" else " ".join(parsed.program)
    if answer["code"] != 0 or not answer["out"].strip():
        return [f"`{name} --help` failed (exit {answer['code']}): {answer['err'][-500:]}"]
    return [f"{name} has no option {flag}" for flag, _ in parsed.flags
            if not _flag_known(helps, parsed, flag, answer["out"])]


def problems_of(helps: HelpServer, item: Documented) -> list[str]:
    parsed = parse(item.text)
    if parsed.kind == "external":
        return []
    if parsed.kind == "make":
        return _check_make(parsed)
    return _check_files(parsed) + _check_flags(helps, parsed)


def fragment_problems(helps: HelpServer, item: Documented, commands: list[Documented]) -> list[str]:
    """Options shown without a command must be options of one of the documented commands."""
    fragment = Parsed("fragment", (), _flags(_tokens(item.text)), ())
    programs = {}
    for command in commands:
        parsed = parse(command.text)
        if parsed.kind in ("mfv", "script", "module"):
            programs.setdefault((parsed.program, tuple(_config_files(parsed))), parsed)
    problems = _check_files(fragment)
    for flag, _ in fragment.flags:
        if flag in NOT_OUR_OPTIONS:
            continue
        if not any(_flag_known(helps, parsed, flag, helps.help(parsed.program)["out"]) for parsed in programs.values()):
            problems.append(f"no documented command has the option {flag}")
    return problems


DOCUMENTED = collect()
FRAGMENTS = collect(fragments=True)


def test_the_documentation_shows_commands() -> None:
    """The collector finds the commands it is meant to check (a broken collector checks nothing)."""
    texts = {(d.file, d.text) for d in DOCUMENTED}
    assert ("README.md", "make test") in texts
    assert any(f == "docs/usage.md" and t.startswith("mfv prepare-gqa") for f, t in texts)
    assert any(f.startswith("configs/") for f, _ in texts)
    assert any(f.startswith("benchmarks/") for f, _ in texts)
    assert any(f.startswith("mfv/") for f, _ in texts)


def test_a_wrong_flag_is_caught(helps) -> None:
    """The check itself fails a flag the command does not have, and a missing config file."""
    assert problems_of(helps, Documented("x", 1, "mfv generate-synthetic --out D --num-images 4"))
    assert problems_of(helps, Documented("x", 1, "python train.py --model.no_such_option 1"))
    assert problems_of(helps, Documented("x", 1, "mfv prepare-gqa --settings.no_such_filter 2"))
    assert problems_of(helps, Documented("x", 1, "python train.py --config configs/missing.yaml"))
    assert problems_of(helps, Documented("x", 1, "make no-such-target"))
    assert not problems_of(helps, Documented("x", 1, "mfv prepare-gqa --settings.min_objects 2 --split x"))
    wrong_fragments = ("--settings.no_such_filter 2", "--model.no_such_option", "--num-image 3",
                       "--settings.min_objects 2 --x")
    for wrong in wrong_fragments:
        assert fragment_problems(helps, Documented("x", 1, wrong), DOCUMENTED), wrong
    assert not fragment_problems(helps, Documented("x", 1, "--settings.min_objects 2 --settings.*"), DOCUMENTED)


@pytest.mark.parametrize("item", DOCUMENTED, ids=[d.id for d in DOCUMENTED])
def test_documented_command_is_true(helps, item: Documented) -> None:
    problems = problems_of(helps, item)
    if (item.file, item.text) in KNOWN_WRONG:
        assert problems, f"{item.file}: `{item.text}` is true now: remove it from KNOWN_WRONG"
        pytest.xfail("; ".join(problems))
    assert not problems, f"{item.file}:{item.line}: `{item.text}`: " + "; ".join(problems)


@pytest.mark.parametrize("item", FRAGMENTS, ids=[d.id for d in FRAGMENTS])
def test_documented_option_exists(helps, item: Documented) -> None:
    problems = fragment_problems(helps, item, DOCUMENTED)
    if (item.file, item.text) in KNOWN_WRONG:
        assert problems, f"{item.file}: `{item.text}` is true now: remove it from KNOWN_WRONG"
        pytest.xfail("; ".join(problems))
    assert not problems, f"{item.file}:{item.line}: `{item.text}`: " + "; ".join(problems)


def test_known_wrong_entries_are_still_documented() -> None:
    documented = {(d.file, d.text) for d in DOCUMENTED + FRAGMENTS}
    assert not KNOWN_WRONG - documented, f"not documented any more: {sorted(KNOWN_WRONG - documented)}"
