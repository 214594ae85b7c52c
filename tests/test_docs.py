"""The documentation's runnable snippets run, so they cannot rot.

A fenced ``python`` or ``bash`` block in README.md or any docs/*.md is *runnable* when the line right before its
opening fence is ``<!-- runnable -->``. Every runnable block of a file runs, in document order (a block may use
what an earlier one wrote), in one temporary working directory that looks like a fresh clone: it links the
repository's top-level files and folders, ``.venv`` included, so ``.venv/bin/msdda``, ``bench/...`` and
``tests/...`` resolve as they do in a checkout, while everything a block writes stays in the temp directory.
Bash blocks run with the virtual environment's bin/ first on PATH; both kinds run without the test suite's
TRITON_INTERPRET, as a user runs them (with the suite's one OpenMP thread, conftest.py, as files run side by side
on the test workers). Blocks that set up an environment (``python3 -m venv``, ``pip install``) must not be marked
runnable: that is checked too.
"""
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MARKER = "<!-- runnable -->"
RUNNABLE_LANGUAGES = ("python", "bash")
# Generous: a block takes seconds on a quiet machine, but the shared 2-core machines can be 20x slower.
BLOCK_TIMEOUT_S = 600
SET_UP = re.compile(r"(-m\s+venv\b|\bpip\s+install\b|\bpip\s+download\b)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str


def runnable_blocks(path: Path) -> list[Block]:
    """The blocks of ``path`` marked runnable, in order. A marker not followed by a python or bash fence is an
    error, so a mistyped marker cannot silently switch a snippet's test off."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
        language = fence[3:].strip()
        if not fence.startswith("```") or language not in RUNNABLE_LANGUAGES:
            raise ValueError(f"{path.name}:{i + 1}: {MARKER} must be followed directly by a ```python or ```bash "
                             f"fence, not {fence!r}")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{path.name}:{i + 2}: unclosed fence")
        code = "\n".join(lines[i + 2:end]) + "\n"
        if SET_UP.search(code):
            raise ValueError(f"{path.name}:{i + 2}: a set-up block (venv, pip) must not be marked runnable")
        blocks.append(Block(path, i + 2, language, code))
    return blocks


def fresh_clone_view(workdir: Path, repo: Path = REPO) -> None:
    """Link the repository's top-level entries into ``workdir`` (and ``.venv`` to the running environment)."""
    for entry in repo.iterdir():
        if entry.name in (".git", ".venv") or entry.name.endswith(".egg-info"):
            continue
        (workdir / entry.name).symlink_to(entry)
    (workdir / ".venv").symlink_to(Path(sys.prefix))


def block_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_blocks(blocks: list[Block], workdir: Path) -> list[str]:
    """Run ``blocks`` in order in ``workdir``; one message per failed block (the later ones still run)."""
    env = block_env()
    env["MSDDA_CACHE"] = str(workdir / ".msdda-cache")  # an export block must not fill the user's cache
    failures = []
    for n, block in enumerate(blocks):
        script = workdir / f".block{n}.{'py' if block.language == 'python' else 'sh'}"
        script.write_text(block.code, encoding="utf-8")
        command = [sys.executable, script.name] if block.language == "python" else ["bash", "-eo", "pipefail",
                                                                                     script.name]
        where = f"{block.path.name}:{block.line} ({block.language})"
        try:
            done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            failures.append(f"{where}: still running after {BLOCK_TIMEOUT_S} s")
            continue
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-3000:]
            failures.append(f"{where}: exit status {done.returncode}\n{tail}")
    return failures


def documentation_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", documentation_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_runnable_blocks_run(path, tmp_path):
    blocks = runnable_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no runnable block")
    fresh_clone_view(tmp_path)
    failures = run_blocks(blocks, tmp_path)
    assert not failures, "\n\n".join(failures)


def test_the_readme_has_runnable_blocks():
    languages = {block.language for block in runnable_blocks(REPO / "README.md")}
    assert languages == {"python", "bash"}


def test_a_broken_block_fails_and_a_good_one_passes(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "page.md"
    page.write_text(
        "# A page\n\n"
        f"{MARKER}\n```bash\necho made > made.txt\n```\n\n"
        "Not runnable, never run:\n\n```bash\nexit 3\n```\n\n"
        f"{MARKER}\n```python\nfrom pathlib import Path\nassert Path('made.txt').read_text() == 'made\\n'\n"
        "print('found it')\n```\n\n"
        f"{MARKER}\n```python\nimport json\njson.no_such_function()\n```\n\n"
        f"{MARKER}\n```bash\nfalse | cat\necho never\n```\n", encoding="utf-8")
    blocks = runnable_blocks(page)
    assert [(b.line, b.language) for b in blocks] == [(4, "bash"), (15, "python"), (22, "python"), (28, "bash")]
    workdir = tmp_path / "work"
    workdir.mkdir()
    fresh_clone_view(workdir)
    failures = run_blocks(blocks, workdir)
    assert len(failures) == 2, failures
    assert failures[0].startswith("page.md:22 (python): exit status 1") and "no_such_function" in failures[0]
    assert failures[1].startswith("page.md:28 (bash): exit status 1")  # pipefail: a failing pipe stage counts
    assert not (REPO / "made.txt").exists() and (workdir / "made.txt").read_text() == "made\n"


@pytest.mark.parametrize("text, message", [
    (f"{MARKER}\n```sh\nls\n```\n", "must be followed directly by"),
    (f"{MARKER}\n\n```bash\nls\n```\n", "must be followed directly by"),
    (f"{MARKER}\n```python\nprint(1)\n", "unclosed fence"),
    (f"{MARKER}\n```bash\npython3 -m venv .venv\n```\n", "set-up block"),
])
def test_misplaced_markers_and_set_up_blocks_are_refused(tmp_path, text, message):
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        runnable_blocks(page)
