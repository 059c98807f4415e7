"""The docs say what the code does: the generated reference pages are current, every config key a page names
exists, every `contrast` command a page shows parses, and the transcripts of `contrast config` print what the
page says they print."""
from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main
from pipeline.config import FREE_FORM_SECTIONS, Config
from tools import gen_reference

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(p for p in (REPO / "docs").rglob("*.md") if "reference" not in p.parts) + [REPO / "README.md"]
SECTIONS = [f.name for f in dataclasses.fields(Config)]
KEY = re.compile(r"(?<![\w./-])((?:" + "|".join(SECTIONS) + r")\.[A-Za-z_][\w.]*(?:\[\])?(?:\.[\w]+)*)")
RUNNABLE = {"config"}                      # transcripts of these commands are run and compared
FILES = ("md", "py", "yaml", "yml", "json", "safetensors", "txt", "tar", "html", "png", "sh")
WRONG_ON_PURPOSE = {"train.no_such_key"}   # the unknown-key example of concepts.md


def code_blocks(page: Path) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced block of a page."""
    blocks, lines, lang = [], None, ""
    for line in page.read_text().splitlines():
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and lines is None:
            lines, lang = [], fence.group(1)
        elif fence:
            blocks.append((lang, lines))
            lines = None
        elif lines is not None:
            lines.append(line)
    return blocks


def resolves(key: str) -> bool:
    """Whether a dotted key names a field of the schema (a list of sections' items by `name[]`)."""
    obj: typing.Any = Config
    for part in key.replace("[]", "").split("."):
        if not dataclasses.is_dataclass(obj):
            return False
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            return False
        hint = typing.get_type_hints(obj)[part]
        args = typing.get_args(hint)
        obj = args[0] if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]) else hint
    return True


def commands(page: Path) -> list[str]:
    """Every complete `contrast …` command line of the page's code blocks (continuations joined; usage
    summaries with alternatives or placeholders like `[key=value ...]` left out)."""
    out = []
    for _, lines in code_blocks(page):
        text = "\n".join(lines).replace("\\\n", " ")
        transcript = any(line.startswith("$ ") for line in lines)       # then the other lines are output
        for line in text.splitlines():
            if transcript and not line.startswith("$ "):
                continue
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"\s+#\s.*$", "", line)
            if line.startswith("contrast ") and not re.search(r" \| |\[|\.\.\.|…|<", line):
                out.append(line)
    return out


def transcripts(page: Path) -> list[tuple[str, list[str]]]:
    """(`$ contrast …` command, the output lines shown after it) of the page's text blocks."""
    found = []
    for lang, lines in code_blocks(page):
        for line in lines:
            if line.startswith("$ contrast "):
                found.append((line[2:], []))
            elif found and lang == "text" and not line.startswith("$ "):
                found[-1][1].append(line)
    return found


def test_the_generated_reference_pages_are_current():
    """`make docs-reference` was run after the last change to the config schema, the CLI or the layout."""
    stale = [name for name, make in gen_reference.PAGE_MAKERS.items()
             if (gen_reference.PAGES / name).read_text() != make()]
    assert stale == [], f"out of date: {stale}; run `make docs-reference`"


def test_the_config_reference_has_every_key_with_its_meaning():
    page = (gen_reference.PAGES / "config.md").read_text()
    for key, _, _, comment in gen_reference.schema_keys(Config):
        assert f"| `{key}` |" in page, key
        assert comment, f"{key} has no comment in pipeline/config.py: say what it is"
    assert "| `train.global_batch` | int | `256` |" in page                       # type and default
    assert "at least 2 (a contrastive batch needs negatives)" in page             # its range
    assert re.search(r"\| `loss.name` \|.*`check_loss_config`", page)             # the check that reads it


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_key_a_page_names_exists(page):
    text = page.read_text()
    named = {m.group(1).rstrip(".") for m in KEY.finditer(text)} - WRONG_ON_PURPOSE
    unknown = sorted(k for k in named if k.split(".")[0] not in FREE_FORM_SECTIONS and k.rsplit(".", 1)[-1] not in FILES
                     and not resolves(k))
    assert unknown == [], f"{page.name} names keys the schema does not have: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_a_page_shows_parses_and_the_runnable_ones_run(page, capsys, monkeypatch):
    """Each `contrast …` line parses; those of the commands that run here in a moment (`contrast config`)
    outside a transcript run and succeed (a transcript's own output says what it expects)."""
    monkeypatch.chdir(REPO)
    parser = build_parser()
    shown_with_output = {command for command, _ in transcripts(page)}
    for line in commands(page):
        argv = shlex.split(line)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}: `{line}` does not parse: {capsys.readouterr().err}")
        if argv[0] in RUNNABLE and line not in shown_with_output:
            assert main(argv) == 0, f"{page.name}: `{line}` failed: {capsys.readouterr().err}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_transcripts_print_what_the_page_shows(page, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    for command, shown in transcripts(page):
        argv = shlex.split(command)[1:]
        if argv[0] not in RUNNABLE:
            continue
        main(argv)
        printed = capsys.readouterr()
        lines = (printed.out + printed.err).splitlines()
        for want in filter(None, shown):
            prefix = want.rstrip(".…").rstrip() if want.endswith(("...", "…")) else None
            assert any(line == want or (prefix and line.startswith(prefix)) for line in lines), \
                f"{page.name}: `{command}` did not print {want!r}; it printed:\n" + "\n".join(lines)


def test_the_checks_can_fail():
    """The checkers above see a wrong key, a wrong flag and a wrong transcript line."""
    assert resolves("train.global_batch") and resolves("data.sources[].weight") and resolves("model.image.lock")
    assert not resolves("train.batch_size") and not resolves("model.image.nope")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "x", "--format", "onnx", "--out", "y"])


def test_every_command_line_argument_says_what_it_is():
    """The CLI reference is the parser's help: an argument without `help=` is a row without meaning."""
    import argparse
    commands = gen_reference.subcommands(build_parser(), ["contrast"])
    missing = [f"{' '.join(path)} {action.dest}" for path, sub in commands for action in sub._actions
               if action.help is None and not isinstance(action, argparse._SubParsersAction)]
    assert missing == []
