"""The documentation states today's truth, checked against the code it describes.

- Every ``nerveseg ...`` command in README.md and docs/ (code blocks and inline code) names a
  subcommand that exists and only options that subcommand has (read from the typer app's click
  objects, not from a subprocess); every ``make TARGET`` names a target of the Makefile.
- Every dotted settings name the docs (and params.yaml's comments) mention, ``train.epochs`` say,
  is a key of the typed settings (``pipeline.config.Params``), or a tag/metric name the code writes;
  every YAML snippet in the docs made of ``params.yaml`` sections is valid settings.
- Every relative link between the docs names a file that exists, and a heading that exists.
- No tracked text file holds an absolute path of one user's or machine's folders.

A failure names the file and line to fix.

Fast and in-process: nothing here starts a server or trains.
"""

from __future__ import annotations

import ast
import bisect
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import typer
import yaml
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config import Params
from tests.conftest import REPO

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name


# --- Markdown: code lines and inline code, with their line numbers ---------------------------------

@dataclass(frozen=True)
class Snippet:
    file: str
    line: int
    text: str
    lang: str | None  # the fence's language for code-block lines; None for inline code


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
# Code blocks in these languages hold no shell commands (YAML settings, Python, JSON bodies, diagrams).
NOT_SHELL = {"yaml", "yml", "python", "py", "json", "toml", "ini", "mermaid", "html", "csv", "text"}


def _snippets(path: Path) -> list[Snippet]:
    """Code-block lines (continuations joined), indented code lines and inline code spans."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    prose: list[tuple[int, str]] = []  # (line number, text) outside fenced blocks
    fence, lang, pending, start = None, None, "", 0
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, lang = match.group(1), match.group(2).lower() or None
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
                continue
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append(Snippet(_rel(path), start, pending + line, lang))
            pending = ""
            continue
        if line.startswith("    ") and line.strip().startswith(("nerveseg ", "$ ")) and "`" not in line:
            out.append(Snippet(_rel(path), number, line.strip().removeprefix("$ "), None))
            continue
        prose.append((number, line))
    # Inline code may wrap onto the next line, but not across a blank line.
    text = "\n".join(line for _, line in prose)
    starts = [0]
    for _, line in prose:
        starts.append(starts[-1] + len(line) + 1)
    for match in re.finditer(r"(?<!`)(`+)(?!`)((?:(?!\n\s*\n).)+?)(?<!`)\1(?!`)", text, re.S):
        index = bisect.bisect_right(starts, match.start()) - 1
        out.append(Snippet(_rel(path), prose[index][0], match.group(2).replace("\n", " "), None))
    return out


@lru_cache(maxsize=None)
def all_snippets() -> tuple[Snippet, ...]:
    return tuple(s for path in DOC_FILES for s in _snippets(path))


def _shell_snippets() -> list[Snippet]:
    return [s for s in all_snippets() if s.lang not in NOT_SHELL]


def _without_quotes_and_comments(text: str) -> str:
    text = text.replace("\\|", "/")  # `a\|b` in a Markdown table cell is the alternative a or b
    text = re.sub(r'"[^"]*"|\'[^\']*\'', " ARG ", text)
    return re.sub(r"(^|\s)#.*$", "", text)


# --- nerveseg commands -----------------------------------------------------------------------------

SEPARATORS = re.compile(r"\s(?:&&|\|\||\|)(?:\s|$)|;")
# `nerveseg` as a command: at the start, after a space, a path (.venv/bin/), `(` or `=`.
COMMAND = re.compile(r"(?:^|(?<=[\s(=/]))nerveseg[ \t]+(?=\S)")
PLACEHOLDER = re.compile(r"^(?:<[^>]*>|\.\.\.|…|[A-Z][A-Z0-9_]*(?:\.\.\.)?|\[.*)$")


@dataclass(frozen=True)
class Command:
    where: str
    text: str


def documented_commands() -> list[Command]:
    commands = []
    for snippet in _shell_snippets():
        text = _without_quotes_and_comments(snippet.text)
        for match in COMMAND.finditer(text):
            rest = SEPARATORS.split(text[match.end():], maxsplit=1)[0].strip().rstrip(")")
            if not rest or not re.match(r"[\w\[<.…-]", rest):
                continue  # a folder or pool named nerveseg, not a command
            commands.append(Command(f"{snippet.file}:{snippet.line}", "nerveseg " + rest))
    return commands


def _params(command) -> list:
    return list(getattr(command, "params", []) or [])


def _option_names(command) -> set[str]:
    names = {"--help"}
    for param in _params(command):
        if param.param_type_name == "option":
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def _subcommands(command) -> dict:
    return dict(getattr(command, "commands", {}) or {})


@lru_cache(maxsize=1)
def cli():
    return typer.main.get_command(app)


def resolve(text: str) -> tuple[list[tuple[list[str], object]], list[str], str | None]:
    """The command paths a documented line names (``approve/reject`` names two), the flags it uses,
    and what is wrong with its subcommand (None when nothing is)."""
    tokens = text.split()[1:]
    paths: list[tuple[list[str], object]] = [([], cli())]
    i = 0
    while i < len(tokens) and all(_subcommands(c) for _, c in paths):
        word = tokens[i]
        if word.startswith("-"):
            break
        if PLACEHOLDER.match(word):  # `nerveseg stage NAME`: any of the group's commands
            paths = [(p + [n], s) for p, c in paths for n, s in _subcommands(c).items()]
            i += 1
            continue
        stepped = []
        for path, command in paths:
            for name in word.split("/"):
                sub = _subcommands(command).get(name)
                if sub is None:
                    known = ", ".join(sorted(_subcommands(command)))
                    return paths, [], (f"`nerveseg {' '.join(path + [name])}` is not a command "
                                       f"(commands here: {known})")
                stepped.append((path + [name], sub))
        paths = stepped
        i += 1
    flags = []
    for token in tokens[i:]:
        for part in token.strip("[]()<>,.").split("/"):
            flag = part.split("=", 1)[0].strip("[]()<>,")
            if re.fullmatch(r"--?[A-Za-z][\w-]*", flag):
                flags.append(flag)
    return paths, flags, None


def test_docs_name_commands_at_all():
    commands = documented_commands()
    assert len(commands) > 50, f"found only {len(commands)} nerveseg command lines: the extraction is broken"
    texts = {c.text for c in commands}
    # One of each kind the extraction must see: a code block, a table cell, an indented code line.
    assert any(t.startswith("nerveseg data add SRC [--format auto/competition") for t in texts), texts
    assert "nerveseg run --force" in texts
    assert any(t.startswith("nerveseg data synth --out DIR --subjects 12") for t in texts)


def test_every_documented_nerveseg_command_exists_with_its_options():
    problems = []
    for command in documented_commands():
        paths, flags, wrong = resolve(command.text)
        if wrong:
            problems.append(f"{command.where}: {wrong}  <- {command.text}")
            continue
        for path, leaf in paths:
            if _subcommands(leaf) and (flags or len(path) < len(command.text.split()) - 1):
                problems.append(f"{command.where}: `nerveseg {' '.join(path)}` needs a subcommand "
                                f"({', '.join(sorted(_subcommands(leaf)))})  <- {command.text}")
                continue
            unknown = [f for f in flags if f not in _option_names(leaf)]
            if unknown:
                options = ", ".join(sorted(_option_names(leaf) - {"--help"})) or "none"
                problems.append(f"{command.where}: `nerveseg {' '.join(path)}` has no option "
                                f"{', '.join(unknown)} (its options: {options})  <- {command.text}")
    assert not problems, "documented commands that do not parse:\n" + "\n".join(problems)


def test_the_command_check_catches_what_it_should():
    assert resolve("nerveseg data add SRC [--no-push]")[2] is None
    assert resolve("nerveseg dat add SRC")[2]
    paths, flags, wrong = resolve("nerveseg approve/reject RUN_ID --reason TEXT [--actor ON_BEHALF_OF]")
    assert wrong is None and [p for p, _ in paths] == [["approve"], ["reject"]]
    assert flags == ["--reason", "--actor"]
    paths, flags, _ = resolve("nerveseg rollback --reasons x")
    assert "--reasons" not in _option_names(paths[0][1])


def test_documented_subcommands_answer_help_with_what_the_docs_use():
    """Every subcommand the docs use renders its --help (what an operator types first), listed in its
    group's help, and its help shows every option the docs use with it (none of them hidden)."""
    flags_of: dict[tuple[str, ...], set[str]] = {}
    for command in documented_commands():
        paths, flags, wrong = resolve(command.text)
        if not wrong:
            for path, leaf in paths:
                if not _subcommands(leaf):
                    flags_of.setdefault(tuple(path), set()).update(flags)
    runner = CliRunner()
    helps: dict[tuple[str, ...], str] = {}

    def help_of(path: tuple[str, ...]) -> str:
        if path not in helps:
            result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
            assert result.exit_code == 0, f"nerveseg {' '.join(path)} --help: {result.output}"
            helps[path] = result.output
        return helps[path]

    problems = []
    for path, flags in sorted(flags_of.items()):
        for depth in range(len(path)):  # `nerveseg --help` lists data, `nerveseg data --help` lists add, ...
            if not re.search(rf"^\W*{re.escape(path[depth])}\s", help_of(path[:depth]), re.M):
                problems.append(f"`{' '.join(['nerveseg', *path[:depth], '--help'])}` does not list {path[depth]}")
        shown = help_of(path)
        problems += [f"`nerveseg {' '.join(path)} --help` does not show {flag}, which the docs use"
                     for flag in sorted(flags) if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", shown)]
    assert len(flags_of) > 20 and any(flags_of.values()), "the extraction is broken"
    assert not problems, "\n".join(problems)


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {t for line in text.splitlines() if (m := re.match(r"^([\w.$()-][\w.$() -]*?)\s*:(?!=)", line))
            for t in m.group(1).split() if not t.startswith((".", "$"))}


def test_documented_make_targets_exist():
    targets = _make_targets()
    assert {"setup", "quickstart", "test"} <= targets
    problems = []
    for snippet in _shell_snippets():
        text = _without_quotes_and_comments(snippet.text)
        for match in re.finditer(r"(?:^|(?<=[\s(]))make[ \t]+([A-Za-z][\w.-]*)", text):
            if match.group(1) not in targets:
                problems.append(f"{snippet.file}:{snippet.line}: `make {match.group(1)}` is not a Makefile target "
                                f"(targets: {', '.join(sorted(targets))})")
    assert not problems, "\n".join(problems)


# --- links between the docs ---------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)|!\[[^\]\n]*\]\(([^)\s]+)\)")


def _github_anchor(heading: str) -> str:
    text = re.sub(r"`|\*\*|(?<!\w)_|_(?!\w)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset[str]:
    anchors, seen, fence = set(), {}, None
    for line in path.read_text(encoding="utf-8").splitlines():
        match = FENCE.match(line)
        if match and fence is None:
            fence = match.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None and (heading := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug = _github_anchor(heading.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return frozenset(anchors)


def test_links_between_the_docs_resolve():
    """A relative link names a file that exists and, for a Markdown file, a heading it has."""
    problems = []
    for path in DOC_FILES:
        fence = None
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = FENCE.match(line)
            if match and fence is None:
                fence = match.group(1)
                continue
            if fence is not None:
                fence = None if line.strip().startswith(fence) else fence
                continue
            for link in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
                target = link.group(1) or link.group(2)
                if re.match(r"^[a-z][\w+.-]*:", target):
                    continue  # https:, mailto:
                name, _, fragment = target.partition("#")
                file = (path.parent / name).resolve() if name else path
                if not file.exists():
                    problems.append(f"{_rel(path)}:{number}: link to {target}: no such file")
                elif fragment and file.suffix == ".md" and fragment not in _anchors(file):
                    problems.append(f"{_rel(path)}:{number}: link to {target}: {file.name} has no heading "
                                    f"with the anchor #{fragment}")
    assert not problems, "\n".join(problems)


def test_anchors_are_githubs():
    assert _github_anchor("The network (`pipeline/model.py`)") == "the-network-pipelinemodelpy"
    assert _github_anchor("Promotion, rollback, audit") == "promotion-rollback-audit"
    assert _github_anchor("Settings: `services.yaml` (never `params.yaml`)") == "settings-servicesyaml-never-paramsyaml"


# --- settings named in the docs --------------------------------------------------------------------

SECTIONS = tuple(Params.model_fields)
DOTTED = re.compile(r"(?<![\w./@:-])(" + "|".join(SECTIONS) + r")\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?![\w/-]|\.\w)")
FILE_SUFFIXES = {"md", "py", "yaml", "yml", "json", "csv", "pt", "png", "html", "txt", "lock", "dvc", "db", "npz",
                 "tif", "log", "toml", "cfg", "sh", "pgdump", "bundle"}
# Names that are neither settings nor written by the code, on purpose.
NOT_SETTINGS = {
    "notify.webhook_url": "a key params.yaml refuses (the webhook is a credential); the docs say so",
}


def _is_setting(dotted: str) -> bool:
    model: object = Params
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return True


@lru_cache(maxsize=1)
def _names_the_code_writes() -> frozenset[str]:
    """String constants of pipeline/ and flows/: MLflow tags and metric names such as
    ``train.precision`` or ``promotion.comparison_subjects`` look like settings but are these."""
    names = set()
    for folder in ("pipeline", "flows"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) < 80:
                    names.add(node.value)
    return frozenset(names)


def _dotted_names(text: str):
    for match in DOTTED.finditer(text):
        rest = match.group(2)
        if rest.rsplit(".", 1)[-1] in FILE_SUFFIXES:
            continue  # data.md, model.pt, split.yaml: files
        yield match.start(), f"{match.group(1)}.{rest}"


def _dotted_name_problems(where: str, text: str) -> list[str]:
    problems = []
    for _, name in _dotted_names(text):
        if _is_setting(name) or name in NOT_SETTINGS or name in _names_the_code_writes():
            continue
        problems.append(f"{where}: `{name}` is not a key of params.yaml (pipeline/config.py, Params) "
                        f"nor a name the code writes")
    return problems


def test_settings_named_in_the_docs_exist():
    problems = []
    for path in DOC_FILES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            problems += _dotted_name_problems(f"{_rel(path)}:{number}", line)
    assert not problems, "\n".join(problems)


def test_settings_named_in_params_yaml_comments_exist():
    problems = []
    for number, line in enumerate((REPO / "params.yaml").read_text().splitlines(), 1):
        if "#" in line:
            problems += _dotted_name_problems(f"params.yaml:{number}", line.split("#", 1)[1])
    assert not problems, "\n".join(problems)


def test_the_settings_check_catches_what_it_should():
    names = [name for _, name in _dotted_names(
        "set train.epochs and promotion.min_comparison_subjects in params.yaml (pipeline.config, "
        "data.md, model.pt, `split.holdout_fraction`, train.amp_gpu, train.augment.hflip_p)")]
    assert names == ["train.epochs", "promotion.min_comparison_subjects", "split.holdout_fraction",
                     "train.amp_gpu", "train.augment.hflip_p"]
    assert _is_setting("train.augment.hflip_p") and _is_setting("split.holdout_fraction")
    assert not _is_setting("train.amp_gpu") and not _is_setting("model.norm.kind")
    assert _dotted_name_problems("x", "train.amp_gpu") and not _dotted_name_problems("x", "train.precision")


def test_settings_snippets_in_the_docs_are_valid_settings():
    """A YAML block made of params.yaml sections is what an operator pastes: it must load."""
    problems, checked = [], 0
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        block, fence, start, lang = None, "", 0, None
        for number, line in enumerate(lines, 1):
            match = FENCE.match(line)
            if block is None and match:
                block, fence, start, lang = [], match.group(1), number, match.group(2).lower()
            elif block is not None and line.strip().startswith(fence):
                if lang in ("yaml", "yml"):
                    try:
                        data = yaml.safe_load("\n".join(block))
                    except yaml.YAMLError:
                        data = None
                    if isinstance(data, dict) and data and set(data) <= set(SECTIONS):
                        checked += 1
                        try:
                            Params.model_validate(data)
                        except ValidationError as exc:
                            problems.append(f"{_rel(path)}:{start}: {exc}")
                block = None
            elif block is not None:
                block.append(line)
    assert checked >= 3, "no params.yaml snippets found: the extraction is broken"
    assert not problems, "\n".join(problems)


def test_params_model_fields_are_pydantic_models():
    # _is_setting walks model_fields; a section that stopped being a model would make every name pass.
    assert all(isinstance(Params.model_fields[s].annotation, type)
               and issubclass(Params.model_fields[s].annotation, BaseModel) for s in SECTIONS)


# --- no machine's local paths in tracked files -----------------------------------------------------

# A user's or machine's own folders: meaningless on any other machine. Built from parts so this file
# does not match itself. A fixed scratch folder under the system's temporary directory in a command or
# script default is the same on every machine and allowed; what one run generated there (pytest's and
# tempfile's folders) is not.
_ROOTS = "|".join(("work", "home", "root", "Users"))
_TMP = "/" + "tmp/"
LOCAL_PATH = re.compile(
    r"(?<![\w.~-])/(?:" + _ROOTS + r")/[\w.-]"
    + "|" + _TMP + r"pytest-|" + _TMP + r"tmp[a-z0-9_]{6,}\b"
    r"|[A-Za-z]:\\{1,2}Users\\{1,2}")


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = []
    for name in listed.decode().split("\0"):
        path = REPO / name
        if name and path.is_file() and not path.is_symlink():
            files.append(path)
    return files


def local_path_findings(paths) -> list[str]:
    findings = []
    for path in paths:
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            match = LOCAL_PATH.search(line)
            if match:  # one finding per line
                context = line[max(0, match.start() - 30):match.end() + 40].strip()
                findings.append(f"{_rel(path)}:{number}: {context}")
    return findings


def test_no_local_absolute_paths_in_tracked_files():
    findings = local_path_findings(_tracked_text_files())
    assert not findings, (f"{len(findings)} absolute paths of one machine's folders in tracked files (use a "
                          "path relative to the project, `../shared`, or a placeholder):\n" + "\n".join(findings))


def test_the_local_path_check_catches_what_it_should(tmp_path):
    sample = tmp_path / "sample.md"
    home, work = "/" + "home/alice/x", "/" + "work/main/params.yaml"  # split: this file is checked too
    pytest_tmp, windows = _TMP + "pytest-of-bob/p0", "C:\\" + "Users\\bob\\x"
    sample.write_text(f"git clone {work} D\nsee {home}\nfile://{work}\n{pytest_tmp}\n"
                      f"{windows}\n{_TMP}fresh is fine\n/etc/xdg/pip/pip.conf\n~/.config/nerveseg\n"
                      "https://example.org/" + "work/x\n")
    found = local_path_findings([sample])
    assert [f.split(":")[1] for f in found] == ["1", "2", "3", "4", "5"], found
