"""The documentation as tests: every fenced block of README.md and docs/ has a language, every command or Python
block is run here or says why not, and every `ailora-tools` command and flag the docs name exists in the CLI."""

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import click
import pytest

from ailora_tools.cli.commands import main as cli_group

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CODE = {"bash", "python"}  # what a reader would run; other fences are output, diagrams or files (text, toml, ...)
MARK = re.compile(r"<!-- docs-test: (run|not-run)(?: \((.+)\))? -->")
FENCE = re.compile(r"^(\s*)```(\S*)")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    mark: str | None
    reason: str | None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with the `docs-test` marker on the line before it (if any)."""
    found, lines, i = [], page.read_text().split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.search(before)
        code = "\n".join(line[len(indent) :] for line in lines[start + 1 : end])
        found.append(Block(page, start + 1, lang, code, mark and mark.group(1), mark and mark.group(2)))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]


def test_every_fence_names_its_language():
    bare = [str(b) for b in ALL if not b.lang]
    assert not bare, f"fenced blocks without a language (use text for output): {bare}"


def test_every_command_or_python_block_is_run_or_says_why_not():
    unmarked = [str(b) for b in ALL if b.lang in CODE and (b.mark is None or (b.mark == "not-run" and not b.reason))]
    assert not unmarked, (
        f"blocks with neither <!-- docs-test: run --> nor <!-- docs-test: not-run (why) --> before them: {unmarked}"
    )
    assert sum(b.mark == "run" for b in ALL) >= 5


def _invocations(text: str) -> list[list[str]]:
    """Each `ailora-tools SUBCOMMAND ...` (or `-m ailora_tools.cli ...`) in shell text, as its words."""
    text = re.sub(r"\\\n", " ", text)
    found = []
    for line in text.split("\n"):
        for part in re.split(r"&&|\|\||;|\|(?!\w*\])", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                words = part.split()
            for i, word in enumerate(words):
                if word == "ailora-tools" or (word == "ailora_tools.cli" and i and words[i - 1] == "-m"):
                    found.append(words[i + 1 :])
                    break
    return found


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(where, words) of every invocation in bash blocks and in inline code spans."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for b in blocks(page):
            if b.lang == "bash":
                found += [(str(b), words) for words in _invocations(b.code)]
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]*ailora-tools [^`\n]*)`", prose):
            found += [(str(page.relative_to(ROOT)), words) for words in _invocations(span)]
    return found


def _options(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names


def test_every_documented_command_and_flag_exists():
    documented = _documented_commands()
    assert len(documented) >= 50
    problems = []
    for where, words in documented:
        if not words or words[0].startswith("-"):
            continue  # `ailora-tools --debug ...`, `ailora-tools --version`
        command = cli_group.commands.get(words[0])
        if command is None:
            if words[0] not in {"COMMAND", "..."}:
                problems.append(f"{where}: no command {words[0]!r}")
            continue
        known = _options(command)
        for word in words[1:]:
            flag = word.strip("[]()").split("=")[0]
            if re.fullmatch(r"--?[a-z][a-z0-9-]*", flag) and flag not in known:
                problems.append(f"{where}: `ailora-tools {words[0]}` has no option {flag}")
    assert not problems, "\n".join(problems)


def test_api_reference_covers_every_public_name():
    import ailora_tools

    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    listed = set(re.findall(r"^::: (\S+)", page, flags=re.M))
    homes = {name: getattr(ailora_tools, name).__module__ for name in ailora_tools.__all__ if name != "__version__"}
    missing = [name for name, module in homes.items() if f"{module}.{name}" not in listed and module not in listed]
    assert not missing, f"public names docs/reference/api.md does not document: {missing}"


RUN_PAGES = sorted({b.page for b in ALL if b.mark == "run"}, key=str)


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUN_PAGES])
def test_run_blocks_of_each_page_run(page, tmp_path):
    """A page's run blocks, in order, in one fresh folder (as a reader would type them), each must exit 0."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's ailora-tools first
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": path}
    for b in blocks(page):
        if b.mark != "run":
            continue
        if b.lang == "bash":
            argv = ["bash", "-e", "-o", "pipefail", "-c", b.code]
        elif b.lang == "python":
            argv = [sys.executable, "-c", b.code]
        else:
            raise AssertionError(f"{b}: run blocks are bash or python, not {b.lang!r}")
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{b} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    missing = undocumented_manifest_keys(tmp_path)
    assert not missing, f"manifest keys docs/reference/manifests.md does not name: {missing}"


def undocumented_manifest_keys(folder: Path) -> list[str]:
    """Top-level keys of the manifests under `folder` that docs/reference/manifests.md does not name."""
    from ailora_tools.manifests import COMPARE_MANIFEST, MANIFESTS
    from ailora_tools.options import DecomposeOptions, TrainOptions

    documented = set(re.findall(r"`([a-z_0-9]+)`", (ROOT / "docs" / "reference" / "manifests.md").read_text()))
    settings = {f.name for options in (DecomposeOptions, TrainOptions) for f in fields(options)}
    missing = []
    for name in MANIFESTS:
        for path in folder.rglob(name):
            keys = set(json.loads(path.read_text())) - documented - (settings if name == COMPARE_MANIFEST else set())
            missing += [f"{path.relative_to(folder)}: {key}" for key in sorted(keys)]
    return sorted(set(missing))
