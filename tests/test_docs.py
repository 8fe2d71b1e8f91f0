"""The documentation stays true: README.md and docs/*.md name only files that exist, link only to files
and headings that exist (GitHub's anchor rule), and every tool command they show parses with the
tool's own parser, its ``--cfg`` file and ``KEY VALUE`` overrides loading as a config (so a renamed
script, flag, config file or config key fails here); their Python examples run."""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import pytest

from mdeq.programs import classification, runner, segmentation
from mdeq.config import load_config
from mdeq.programs.launch import config_from_args

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "pretrained_models" / "README.md"]
#: the folders of the repository whose files the pages name; a named path below them must exist
CHECKED_FOLDERS = ("tools", "experiments", "lib", "tests", "docs")
#: paths that the pages name as examples of a user's file (in an error message), not as files of the repository
EXAMPLE_PATHS = {"experiments/x.yaml"}
#: a shown line is a command when it starts so: environment settings, taskset, then the program
COMMAND_START = re.compile(r"(\w+=\S* )*(taskset -c \S+ )?(python3? |torchrun |sbatch |tools/)")
#: a command shown runs its tool up to the first of these shell words
SHELL_ENDS = {"&&", "||", "|", ";", ">", ">>", "2>&1"}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _outside_fences(text: str) -> List[str]:
    """The lines of a markdown text that are not inside ``` fences."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (backticks included) dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset:
    """Every heading anchor of a markdown page, repeated headings numbered -1, -2 as GitHub does."""
    seen: Dict[str, int] = {}
    out = set()
    for line in _outside_fences(page.read_text()):
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = github_slug(m.group(1))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return frozenset(out)


def links(page: Path) -> List[Tuple[str, str]]:
    """(target path, anchor) of every relative markdown link and image of a page."""
    text = "\n".join(_outside_fences(page.read_text()))
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            path, _, anchor = target.partition("#")
            out.append((path, anchor))
    return out


def named_paths(page: Path) -> List[str]:
    """The repository paths a page names below :data:`CHECKED_FOLDERS` (commands, prose, tables)."""
    found = re.findall(r"(?<![\w./-])((?:%s)/[\w./-]*\w)" % "|".join(CHECKED_FOLDERS), page.read_text())
    return sorted(set(found) - EXAMPLE_PATHS)


def shown_commands(page: Path) -> List[str]:
    """The tool commands a page shows: in code blocks (indented or fenced, continuation lines joined)
    and as inline code that starts with ``python`` or ``torchrun``."""
    commands, pending = [], ""
    fenced = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            commands.append(pending)
        else:
            commands += re.findall(r"`((?:python|torchrun|sbatch) [^`]+)`", line)
        pending = ""
    return [c for c in commands if COMMAND_START.match(c) and re.search(r"(tools|pretrained_models)/\w+\.py", c)]


@lru_cache(maxsize=None)
def _load_tool(path: Path):
    spec = importlib.util.spec_from_file_location(f"doc_tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parser_of(script: str) -> Callable[[Sequence[str]], argparse.Namespace]:
    """The function that parses a tool's command line, as the tool itself does."""
    programs = {"tools/cls_train.py": (classification.PROGRAM, False), "tools/cls_valid.py": (classification.PROGRAM, True),
                "tools/seg_train.py": (segmentation.PROGRAM, False), "tools/seg_test.py": (segmentation.PROGRAM, True)}
    if script in programs:
        program, test = programs[script]
        return lambda argv: runner.parse_args(program, argv, test=test)
    return _load_tool(REPO / script).parse_args


def parse_command(command: str) -> argparse.Namespace:
    """Parse a shown command line with its tool's parser and load its config with its overrides.
    A usage error (argparse's exit) becomes an AssertionError naming the command."""
    words = shlex.split(command, comments=True)
    at = next(i for i, w in enumerate(words) if re.fullmatch(r"(tools|pretrained_models)/\w+\.py", w))
    argv = []
    for word in words[at + 1:]:
        if word in SHELL_ENDS:
            break
        argv.append(word)
    try:
        args = _parser_of(words[at])(argv)
    except SystemExit as e:
        raise AssertionError(f"the command {command!r} does not parse (exit {e.code})") from None
    cfgs = getattr(args, "cfg", "") or []
    for cfg in [cfgs] if isinstance(cfgs, str) else cfgs:   # tools/model_cost.py takes several
        assert (REPO / cfg).is_file(), f"{command!r}: --cfg {cfg} does not exist"
        if isinstance(cfgs, str):
            config_from_args(args)
        else:
            load_config(str(REPO / cfg), [])
    return args


def _all(fn) -> List[Tuple[str, str]]:
    return [(_rel(page), item) for page in PAGES for item in fn(page)]


def test_the_pages_exist_and_the_readme_is_a_front_page():
    assert len(PAGES) >= 5, PAGES
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
    assert "python -m pytest -q tests" in (REPO / "README.md").read_text().split("## Run the tests", 1)[1]


def test_github_slug_rule():
    assert github_slug("GPU check (`tools/gpu_check.sh`)") == "gpu-check-toolsgpu_checksh"
    assert github_slug("Faithful to the original, more accurate than it") == "faithful-to-the-original-more-accurate-than-it"
    assert "what-a-run-writes" in anchors(REPO / "docs" / "training.md")


@pytest.mark.parametrize("page,path", _all(named_paths))
def test_named_paths_exist(page, path):
    assert (REPO / path.rstrip(".")).exists(), f"{page} names {path}, which does not exist"


@pytest.mark.parametrize("page,link", _all(links))
def test_links_and_anchors_exist(page, link):
    path, anchor = link
    target = (REPO / page).parent / path if path else REPO / page
    assert target.exists(), f"{page} links to {path}, which does not exist"
    if anchor:
        assert target.suffix == ".md", f"{page}: an anchor into {path}, which is not a markdown page"
        assert anchor in anchors(target.resolve()), f"{page}: no heading #{anchor} in {path or page}"


def test_every_tool_is_documented():
    text = "\n".join(page.read_text() for page in PAGES)
    tools = sorted(_rel(p) for p in (REPO / "tools").iterdir() if p.suffix in (".py", ".sh"))
    assert [t for t in tools if t not in text] == []
    for script in tools:
        if script.endswith(".sh"):
            assert os.access(REPO / script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("page,command", _all(shown_commands))
def test_shown_commands_parse(page, command):
    args = parse_command(command)
    assert isinstance(args, argparse.Namespace)


def test_a_renamed_flag_or_config_key_fails():
    assert len(_all(shown_commands)) >= 20
    parse_command("python tools/benchmark.py --cfg experiments/digits/cls_mdeq_digits.yaml --batch-size 4")
    with pytest.raises(AssertionError, match="does not parse"):
        parse_command("python tools/benchmark.py --cfg experiments/digits/cls_mdeq_digits.yaml --batch-sise 4")
    with pytest.raises(AssertionError, match="does not parse"):
        parse_command("python tools/cls_valid.py --cfg experiments/digits/cls_mdeq_digits.yaml --f-thres-swep 2,4")
    with pytest.raises(Exception, match="MODEL.F_THRES"):
        parse_command("python tools/cls_train.py --cfg experiments/digits/cls_mdeq_digits.yaml MODEL.F_TRES 3")


def python_examples() -> List[Tuple[str, str]]:
    return [(_rel(page), code) for page in PAGES
            for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


@pytest.mark.parametrize("page,code", python_examples())
def test_python_examples_run(page, code, monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(code, f"{page} example", "exec"), namespace)
    assert namespace, page
