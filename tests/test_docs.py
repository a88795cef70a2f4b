"""The documentation holds together: every relative link of README.md, docs/*.md and
bench/README.md resolves to a file of the repository (and an ``#anchor`` into a markdown file
to one of its headings), none leaves the repository, and the README fits on a screen.

Standard library only, no servers: the files are read as text.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250


def documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# `](target)` or `](target "title")`: the end of every inline link and image.
_INLINE = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_HTML = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']*)["']""")
_HTML_ID = re.compile(r"""\b(?:id|name)\s*=\s*["']([^"']*)["']""")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines: list[str] = []
    fence: str | None = None
    for line in text.splitlines():
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None and line.lstrip().startswith(fence):
            fence = None
        elif fence is None:
            lines.append(line)
    return lines


def link_targets(text: str) -> list[str]:
    """Every link target of a markdown text: inline links and images, reference definitions,
    and HTML ``href``/``src``; code blocks and code spans are not looked at."""
    targets: list[str] = []
    for line in prose_lines(text):
        line = _CODE_SPAN.sub("", line)
        targets += _INLINE.findall(line)
        targets += _REFERENCE.findall(line)
        targets += _HTML.findall(line)
    return targets


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lowercase, punctuation other than '-' and '_'
    removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file: one per heading (GitHub numbers repeats: ``x``,
    ``x-1``, ...), and any HTML ``id`` or ``name``."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(_HTML_ID.findall(line))
        heading = _HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        repeats = seen.get(base, 0)
        seen[base] = repeats + 1
        found.add(base if repeats == 0 else f"{base}-{repeats}")
    return found


def problems(document: Path) -> list[str]:
    """What is wrong with the links of ``document``, one line each."""
    name = document.relative_to(ROOT)
    found: list[str] = []
    for target in link_targets(document.read_text(encoding="utf-8")):
        if not target or _SCHEME.match(target):
            continue  # an external address (or an empty link, which markdown allows)
        if "shared/" in target:
            found.append(f"{name}: {target}: links the shared folder outside the repository")
            continue
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if not path_part:
            resolved = document
        elif path_part.startswith("/"):
            resolved = (ROOT / path_part.lstrip("/")).resolve()
        else:
            resolved = (document.parent / path_part).resolve()
        if not resolved.is_relative_to(ROOT):
            found.append(f"{name}: {target}: leaves the repository")
            continue
        if not resolved.exists():
            found.append(f"{name}: {target}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            found.append(f"{name}: {target}: no heading with that anchor")
    return found


def test_every_relative_link_resolves_inside_the_repository() -> None:
    found = [line for document in documents() for line in problems(document)]
    assert not found, "\n".join(found)


def test_no_document_names_the_contract_outside_the_repository() -> None:
    named = [
        str(document.relative_to(ROOT))
        for document in documents()
        if "../shared" in (text := document.read_text(encoding="utf-8")) or "SPEC.md" in text
    ]
    assert not named, f"the contract is docs/contract.md; these name another: {named}"


def test_the_readme_fits_on_a_screen() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"


def settings_names() -> set[str]:
    """The environment variables of ``increment_service.settings.Settings`` (its fields,
    upper-cased), read from the source without importing it."""
    source = ROOT / "src" / "increment_service" / "settings.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Settings":
            return {
                statement.target.id.upper()
                for statement in node.body
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
            }
    raise AssertionError(f"{source} defines no class Settings")


def test_the_readme_table_lists_every_setting() -> None:
    rows = {
        match.group(1)
        for line in README.read_text(encoding="utf-8").splitlines()
        if (match := re.match(r"\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", line))
    }
    missing = sorted(settings_names() - rows)
    assert not missing, f"README.md's settings table does not list {missing}"


def test_the_link_checker_sees_what_it_should() -> None:
    text = (
        '[a](docs/api.md#errors) ![b](bench/results/x.png "t") [`c`](../x)\n'
        "```sh\n[not](a-link)\n```\n"
        '`[nor](this)` <a href="README.md">d</a>\n'
        "[ref]: https://example.com\n"
    )
    assert link_targets(text) == [
        "docs/api.md#errors",
        "bench/results/x.png",
        "../x",
        "README.md",
        "https://example.com",
    ]
    assert slug("What `bench.run` measures") == "what-benchrun-measures"
    assert slug("Idempotency-Key") == "idempotency-key"
    assert slug("Prefer: durable") == "prefer-durable"
    assert slug("Workers and shutdown") == "workers-and-shutdown"
