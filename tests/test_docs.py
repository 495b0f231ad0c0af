"""The README and the pages in docs/ stay true to the repository: every relative link (and its
#anchor, where it names a heading of a markdown file) resolves, and every ``lowlabel <command>``
they name still exists, takes the options they show it with, and prints its ``--help``.

In-process (``lowlabel.cli.main``), so the whole file takes about a second."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from lowlabel.cli import build_parser, main

from .conftest import REPO

PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "benchmarks" / "README.md", REPO / "benchmarks" / "probes" / "README.md"])
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # where commands are named for users

LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"(`+)(.+?)\1")


def _strip_code(text: str) -> str:
    """The text without fenced blocks and inline code spans (links inside code are not links)."""
    return SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: link text kept, markup and punctuation dropped,
    lower case, each space a hyphen."""
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    h = h.replace("`", "").replace("*", "").strip().lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_strip_code(path.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_pages_exist_and_the_readme_links_them():
    pages = {"methods.md", "data-format.md", "cli.md", "gis.md", "weak-labels.md", "benchmarks.md", "troubleshooting.md"}
    assert pages <= {p.name for p in (REPO / "docs").glob("*.md")}
    readme = (REPO / "README.md").read_text()
    assert all(f"(docs/{n})" in readme for n in pages)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    dead = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            dead.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"{target} (no heading #{anchor} in {dest.relative_to(REPO)})")
        elif REPO not in dest.parents and dest != REPO:
            dead.append(f"{target} (outside the repository)")
    assert not dead, f"{page.relative_to(REPO)}: dead links: " + "; ".join(dead)


def test_link_checker_sees_dead_links(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## A section\n\n[ok](b.md#b-one) [ok2](#a-section) [dead](c.md) [bad anchor](b.md#nope)\n"
                                   "`[not a link](x.md)` [web](https://example.com/x.md)\n")
    (tmp_path / "b.md").write_text("# B: one\n")
    assert relative_links(tmp_path / "a.md") == ["b.md#b-one", "#a-section", "c.md", "b.md#nope"]
    assert anchors(tmp_path / "b.md") == {"b-one"} and "a-section" in anchors(tmp_path / "a.md")


def _code_snippets(text: str) -> list[str]:
    """Each line of a fenced block and each inline code span."""
    snippets = [ln for block in FENCE.findall(text) for ln in block.splitlines()]
    snippets += [m.group(2) for m in SPAN.finditer(FENCE.sub("", text))]
    return snippets


def named_commands(text: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """(command path, options shown with it) for every ``lowlabel <command> ...`` in the code of
    a page. A shell line is cut at ``&&``, ``|``, ``;`` and ``#``; placeholders (``COMMAND``) and
    the global options (``--debug``, ``--version``, ``--help``) name no command."""
    parser = build_parser()
    found = []
    for snippet in _code_snippets(text):
        snippet = re.sub(r"\\\|", "|", snippet)  # an escaped pipe in a table cell
        for segment in re.split(r"\s(?:&&|\|\||\||;)\s|\s#\s", snippet):
            m = re.search(r"(?:^|(?<=[\s(]))lowlabel\s+(.*)", segment)
            if not m:
                continue
            tokens = m.group(1).split()
            while tokens and tokens[0] == "--debug":
                tokens.pop(0)
            if not tokens or not re.fullmatch(r"[a-z][a-z0-9-]*", tokens[0]):
                continue
            path = [tokens[0]]
            sub = _subparsers(parser).get(tokens[0])
            if sub is not None and len(tokens) > 1 and tokens[1] in _subparsers(sub):
                path.append(tokens[1])
            options = [t.split("=")[0] for t in tokens[len(path):] if re.fullmatch(r"\[?(--?[a-zA-Z][\w-]*)(=\S*)?\]?", t)]
            found.append((tuple(path), [o.strip("[]") for o in options]))
    return found


def _subparsers(parser) -> dict:
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return dict(action.choices)
    return {}


def _command_parser(path: tuple[str, ...]):
    parser = build_parser()
    for name in path:
        subs = _subparsers(parser)
        if name not in subs:
            return None
        parser = subs[name]
    return parser


def test_commands_named_in_the_docs_exist_take_their_options_and_print_help():
    named = [(page, path, opts) for page in DOCS for path, opts in named_commands(page.read_text())]
    paths = {path for _, path, _ in named}
    assert {("quickstart",), ("weights", "list"), ("fit",), ("predict",), ("bench",), ("retrieve",)} <= paths  # the scan sees them
    problems = []
    for page, path, opts in named:
        parser = _command_parser(path)
        if parser is None:
            problems.append(f"{page.name}: `lowlabel {' '.join(path)}` is no command")
            continue
        known = set(parser._option_string_actions)
        problems += [f"{page.name}: `lowlabel {' '.join(path)}` has no option {o}" for o in opts if o not in known]
    assert not problems, "\n".join(problems)
    for path in sorted(paths):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            main([*path, "--help"])
        assert exit_.value.code == 0, path
        assert f"lowlabel {' '.join(path)}" in out.getvalue()  # its own usage line


def test_command_scan_sees_renamed_commands_and_options():
    text = ("```bash\npip install -e . && lowlabel quickstart --out q\nlowlabel weights list | cat\n```\n"
            "`lowlabel --debug fit -c C [--resume RUN]` `lowlabel COMMAND` `lowlabel trainn` `lowlabel bench P --onlyy M`\n")
    named = named_commands(text)
    assert (("quickstart",), ["--out"]) in named and (("weights", "list"), []) in named
    assert (("fit",), ["-c", "--resume"]) in named
    assert (("trainn",), []) in named and _command_parser(("trainn",)) is None
    assert (("bench",), ["--onlyy"]) in named and "--onlyy" not in _command_parser(("bench",))._option_string_actions
    assert not any(path == ("COMMAND",) for path, _ in named)


def test_no_issue_numbers_in_the_readme_and_docs():
    hits = [f"{p.relative_to(REPO)}:{i}: {ln.strip()}" for p in DOCS for i, ln in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"issue [0-9]", ln)]
    assert not hits, "\n".join(hits)


def test_readme_keeps_the_ci_commands():
    readme = (REPO / "README.md").read_text()
    assert "pip install -e . && lowlabel quickstart\n" in readme
    assert "pip install -e '.[test]' && python -m pytest -q\n" in readme
    assert "python -m pytest -q\n" in (REPO / ".ci" / "run").read_text()
