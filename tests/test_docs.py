"""The documentation: the MkDocs site builds with strict checks, every block that README.md and docs/*.md mark
runnable runs against the shipped models, and the README stays a front page whose links resolve.

A runnable block is a fenced ``bash`` or ``python`` block right after a line ``<!-- runnable -->``; a block after
``<!-- file: NAME -->`` is written to NAME for the page's later blocks (docs/contributing.md describes both)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import inversionview

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = "<!-- runnable -->"
FILE_MARK = re.compile(r"<!-- file: ([\w.-]+) -->")
FENCE = re.compile(r"(`{3,}|~{3,})\s*([\w+-]*)")
LANGS = {"bash": "bash", "sh": "bash", "python": "python"}
TIMEOUT = 120  # seconds per block


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    kind: str  # "run" or "file"
    lang: str
    code: str
    name: str | None = None  # the file a "file" block is written to


def _fence_end(lines: list[str], start: int, fence: str) -> int:
    """Index of the line closing the fence opened at ``start`` (len(lines) if it is never closed)."""
    for j in range(start + 1, len(lines)):
        s = lines[j].strip()
        if s and set(s) == {fence[0]} and len(s) >= len(fence):
            return j
    return len(lines)


def _marker(line: str, where: str):
    """(kind, file name) for a marker line, None for any other line; a malformed marker raises ValueError."""
    if line == RUNNABLE:
        return "run", None
    if m := FILE_MARK.fullmatch(line):
        return "file", m.group(1)
    if line.startswith("<!--") and re.search(r"runn?able|file\s*:", line, re.I):
        raise ValueError(f"{where}: malformed marker {line!r}: write {RUNNABLE} or <!-- file: NAME -->")
    return None


def marked_blocks(text: str, page: str = "page") -> list[Block]:
    """The marked blocks of one Markdown text, in order. Markers inside fenced blocks are text, not markers; a
    marker must be followed (blank lines aside) by a fenced block, and a runnable one must be bash or python."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending, i = None, 0
    while i < len(lines):
        line = lines[i].strip()
        if m := FENCE.match(line):
            end = _fence_end(lines, i, m.group(1))
            if pending:
                kind, name, _ = pending
                lang = m.group(2).lower()
                if kind == "run" and lang not in LANGS:
                    raise ValueError(f"{page}:{i + 1}: a runnable block must be bash or python, not {lang!r}")
                indent = len(lines[i]) - len(lines[i].lstrip())
                code = "\n".join(x[indent:] for x in lines[i + 1 : end])
                blocks.append(Block(page, i + 1, kind, LANGS.get(lang, lang), code, name))
            pending, i = None, end + 1
            continue
        if pending and line:
            raise ValueError(f"{page}:{pending[2]}: the marker is not followed by a fenced code block")
        if (mark := _marker(line, f"{page}:{i + 1}")) is not None:
            pending = (*mark, i + 1)
        i += 1
    if pending:
        raise ValueError(f"{page}:{pending[2]}: the marker is not followed by a fenced code block")
    return blocks


def page_blocks(path: Path) -> list[Block]:
    return marked_blocks(path.read_text(), str(path.relative_to(ROOT)))


def _pages_with_examples() -> list[Path]:
    """Pages with runnable blocks, and pages whose markers do not parse (so that their test reports why)."""
    out = []
    for p in PAGES:
        try:
            if any(b.kind == "run" for b in page_blocks(p)):
                out.append(p)
        except ValueError:
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------- the parser
def test_marked_blocks_parse():
    text = "\n".join(
        [
            "<!-- runnable -->",
            "```bash",
            "echo one",
            "```",
            "````markdown",
            "<!-- runnable -->",
            "```bash",
            "echo inside an example",
            "```",
            "````",
            "<!-- file: q.jsonl -->",
            "",
            "```json",
            '{"a": 1}',
            "```",
            "```bash",
            "echo not marked",
            "```",
            "!!! note",
            "    <!-- runnable -->",
            "    ```python",
            "    print(2)",
            "    ```",
        ]
    )
    blocks = marked_blocks(text)
    assert [(b.kind, b.lang, b.code, b.name) for b in blocks] == [
        ("run", "bash", "echo one", None),
        ("file", "json", '{"a": 1}', "q.jsonl"),
        ("run", "python", "print(2)", None),
    ]
    assert [b.line for b in blocks] == [2, 13, 21]
    for bad, msg in [
        ("<!-- runable -->\n```bash\nls\n```", "malformed"),
        ("<!--runnable-->\n```bash\nls\n```", "malformed"),
        ("<!-- runnable -->\ntext\n```bash\nls\n```", "not followed"),
        ("<!-- runnable -->", "not followed"),
        ("<!-- runnable -->\n```toml\na = 1\n```", "bash or python"),
    ]:
        with pytest.raises(ValueError, match=msg):
            marked_blocks(bad)


def test_docs_mark_their_examples():
    """The README's three-line API and the getting-started page are runnable, so the parser finds what CI runs."""
    readme = [b for b in page_blocks(README) if b.kind == "run"]
    assert any(b.lang == "python" and 'InversionView.load("shipped:counting")' in b.code for b in readme)
    started = [b for b in page_blocks(ROOT / "docs" / "getting-started.md") if b.kind == "run"]
    assert {b.lang for b in started} == {"bash", "python"}


# ----------------------------------------------------------------------------------------------- the README
def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text) < 8000, f"README.md has {len(text)} characters; move detail into docs/"
    lines = text.splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2] == "```bash" and lines[5] == "```", (
        "the README must open with the two set-up commands"
    )
    # CI installs what the README's second command installs (.ci/run: "exactly this")
    ci_extras = re.findall(r'-e "(\.\[[^"]*\])"', (ROOT / ".ci" / "run").read_text())
    assert re.findall(r'-e "(\.\[[^"]*\])"', lines[4]) == ci_extras


def test_readme_links_resolve():
    targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert local, "the README links into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


# -------------------------------------------------------------------------------------------- the site
def test_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed: pip install -e '.[docs]' (CI installs them)")
    site = tmp_path / "site"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for page in (ROOT / "docs").glob("*.md"):
        html = site / "index.html" if page.stem == "index" else site / page.stem / "index.html"
        assert html.exists(), f"{page.name} was not built"


# ----------------------------------------------------------------------------------- the runnable examples
def _example_env(tmp: Path) -> dict:
    """The environment of a block: this interpreter's `inversionview` first on PATH (the console script next to
    it, else a shim), the package the tests import first on PYTHONPATH, no colour, no display, and one thread
    (as conftest.py gives the tests: on 2 shared cores two threads made the README's example 2x slower)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "inversionview").exists():
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "inversionview"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m inversionview "$@"\n')
        shim.chmod(0o755)
    src = str(Path(inversionview.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(
        PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
        NO_COLOR="1",
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join(x for x in [src, env.get("PYTHONPATH")] if x),
    )
    return env


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_examples(), ids=lambda p: p.name)
def test_runnable_examples(page, tmp_path):
    """Every runnable block of the page, in order, in one fresh directory (the page's files written first)."""
    work = tmp_path / "work"
    work.mkdir()
    env = _example_env(tmp_path)
    for b in page_blocks(page):
        if b.kind == "file":
            (work / b.name).write_text(b.code + "\n")
            continue
        cmd = ["bash", "-euo", "pipefail", "-c", b.code] if b.lang == "bash" else [sys.executable, "-c", b.code]
        try:
            r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{b.page}:{b.line}: the example ran over {TIMEOUT} s:\n{b.code}")
        assert r.returncode == 0, (
            f"{b.page}:{b.line}: the example failed (exit {r.returncode}):\n{b.code}\n"
            f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
        )


@pytest.mark.slow
def test_the_screenshot_script_remakes_the_viewer_picture(tmp_path):
    """docs/viewer.png is made by scripts/screenshot.py from the current viewer: the script runs, and the picture in
    the docs has its size (re-make it with `python scripts/screenshot.py` when the viewer changes)."""
    import runpy

    from matplotlib.image import imread

    out = tmp_path / "viewer.png"
    runpy.run_path(str(ROOT / "scripts" / "screenshot.py"), run_name="screenshot")["main"](str(out))
    made, shipped = imread(out), imread(ROOT / "docs" / "viewer.png")
    assert made.shape == shipped.shape == (1250, 1400, made.shape[2])
