"""The repository's text: no file says in which sitting of work it was written or names an
issue by its number (the pattern FORBIDDEN), and every relative link of README.md and
docs/*.md leads to a file that exists and, with a #anchor into a Markdown file, to one of its
headings (GitHub's anchors)."""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Split so that this file does not match itself.
FORBIDDEN = re.compile("sess" "ion|iss" "ue [0-9]", re.IGNORECASE)
# pytest's own fixture scope is the one use allowed.
ALLOWED = 'scope="' + "sess" 'ion"'
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "build", "dist",
                ".whl", ".whl_base", "out", "halo-demo-out", "node_modules"}


def _git_toplevel(root: Path):
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root,
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:  # no git on this machine
        return None
    if out.returncode != 0:
        return None
    return Path(out.stdout.strip()).resolve()


def _grep_git(root: Path) -> list:
    """(path, line number, line) of every line of the checkout's tracked and untracked,
    not ignored, text files that the pattern matches."""
    out = subprocess.run(["git", "grep", "--untracked", "-I", "-n", "-i", "-E",
                          FORBIDDEN.pattern, "--", ".", ":(exclude).venv"],
                         cwd=root, capture_output=True, text=True, check=False)
    if out.returncode > 1:
        raise RuntimeError(f"git grep failed: {out.stderr}")
    hits = []
    for line in out.stdout.splitlines():
        path, number, text = line.split(":", 2)
        hits.append((path, int(number), text))
    return hits


def _grep_walk(root: Path) -> list:
    """The same as _grep_git, walking the folder (a copy that is not a git checkout)."""
    hits = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or any(part in SKIPPED_DIRS or part.endswith(".egg-info")
                                      for part in relative.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append((relative.as_posix(), number, line))
    return hits


def forbidden_mentions(root: Path) -> list:
    """Lines that FORBIDDEN matches, pytest's fixture scope aside."""
    toplevel = _git_toplevel(root)
    hits = _grep_git(root) if toplevel == root.resolve() else _grep_walk(root)
    return [f"{path}:{number}: {text.strip()}" for path, number, text in hits
            if FORBIDDEN.search(text.replace(ALLOWED, ""))]


FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$", re.MULTILINE)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading's text: Markdown's code marks, emphasis and links reduced
    to their text, lowercased, every character but letters, digits, '_', '-' and spaces
    dropped, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.strip().lower()
    kept = "".join(c for c in text
                   if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(markdown: str) -> set:
    """The anchors of a Markdown text's headings (outside code blocks), repeats numbered as
    GitHub numbers them (-1, -2, ...)."""
    seen: dict = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def broken_links(files) -> list:
    """Every relative link of the Markdown `files` whose file is missing, or whose #anchor into a
    Markdown file names no heading of it."""
    broken = []
    for source in files:
        text = source.read_text(encoding="utf-8")
        prose = INLINE_CODE.sub("", FENCE.sub("", text))
        for target in LINK.findall(prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, mailto:, ...
                continue
            path_part, _, anchor = target.partition("#")
            path = (source.parent / path_part).resolve() if path_part else source
            where = f"{source.name}: ({target})"
            if not path.exists():
                broken.append(f"{where}: no file {path_part}")
            elif anchor and path.suffix.lower() == ".md":
                if anchor not in anchors(path.read_text(encoding="utf-8")):
                    broken.append(f"{where}: no heading #{anchor} in {path.name}")
    return broken


def doc_files(root: Path) -> list:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def test_no_file_mentions_a_sitting_of_work_or_an_issue_number():
    assert forbidden_mentions(ROOT) == []


def test_the_search_finds_a_mention_outside_a_git_checkout(tmp_path):
    (tmp_path / "notes.md").write_text("Measured in the third " + "sess" "ion.\n")
    (tmp_path / "conftest.py").write_text(f"@pytest.fixture({ALLOWED})\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "site.py").write_text("iss" "ue 12\n")
    assert forbidden_mentions(tmp_path) == ["notes.md:1: Measured in the third "
                                            + "sess" "ion."]


def test_relative_links_of_readme_and_docs_resolve():
    assert broken_links(doc_files(ROOT)) == []


def test_the_link_check_reports_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(
        "# Guide\n\n## Inductor's modes (`mode=`)\n\n## Known limits, and what is next\n"
        "```bash\n# not a heading\n```\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/guide.md) [ok](docs/guide.md#inductors-modes-mode)\n"
        "[ok](docs/guide.md#known-limits-and-what-is-next) [ok](#readme) [web](https://x.org/a)\n"
        "`[code](missing.md)`\n"
        "# README\n"
        "[gone](docs/missing.md) [bad anchor](docs/guide.md#not-a-heading)"
        " [code block](docs/guide.md#not-a-heading-1)\n")
    assert broken_links([readme]) == [
        "README.md: (docs/missing.md): no file docs/missing.md",
        "README.md: (docs/guide.md#not-a-heading): no heading #not-a-heading in guide.md",
        "README.md: (docs/guide.md#not-a-heading-1): no heading #not-a-heading-1 in guide.md",
    ]


def test_github_anchors():
    assert github_anchor("Inductor's modes") == "inductors-modes"
    assert github_anchor("Known limits, and what is next") == "known-limits-and-what-is-next"
    assert github_anchor('Rotated inference (`rotate="fused"`)') == "rotated-inference-rotatefused"
    assert github_anchor("One primitive op: `halo::scaled_matmul(A [M,K], B [N,K]) -> A Bᵀ`") == (
        "one-primitive-op-haloscaled_matmula-mk-b-nk---a-bᵀ")
