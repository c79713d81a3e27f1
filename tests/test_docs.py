"""The documentation builds as a site without broken links, and its commands are ones the CLI takes.

Why: a README or docs page whose example uses a renamed flag fails the first user who copies it.
Running every example needs real datasets and CLIP weights, so this checks what can be checked on
any machine: each `upperson ...` line in a bash block parses with the real argument parser
(`upperson.cli._parser`). Lines with an elision (`...`) or an optional part in brackets are
illustrations, not commands, and are skipped; so are lines after a `# needs:` marker in the block.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from upperson.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)
LAUNCHERS = (re.compile(r"^upperson\s"), re.compile(r"^torchrun\s.*?-m upperson\s"), re.compile(r"^python3? -m upperson\s"))


def shell_commands(page: Path) -> list[str]:
    """The `upperson` command lines of a page's bash blocks, continuation lines joined."""
    commands = []
    for block in BASH_BLOCK.findall(page.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("# needs:"):
                break
            command = shlex.split(line, comments=True) if line and not line.startswith("#") else []
            text = " ".join(command)
            for launcher in LAUNCHERS:
                match = launcher.match(text + " ")
                if match and "..." not in text and "[--" not in text:
                    commands.append(text)
    return commands


def cli_arguments(command: str) -> list[str]:
    """The arguments after the `upperson` program name of one command line."""
    words = shlex.split(command)
    return words[words.index("upperson") + 1 :] if "upperson" in words else words[1:]


EXAMPLES = [(page.relative_to(ROOT).as_posix(), command) for page in PAGES if page.exists() for command in shell_commands(page)]


def test_pages_have_examples() -> None:
    # guards the extraction itself: if the regexes stopped matching, every parse test would vanish
    assert len(EXAMPLES) >= 20, EXAMPLES


@pytest.mark.parametrize(("page", "command"), EXAMPLES, ids=[f"{page}:{i}" for i, (page, _) in enumerate(EXAMPLES)])
def test_documented_command_parses(page: str, command: str) -> None:
    try:
        _parser().parse_args(cli_arguments(command))
    except SystemExit as exc:
        if exc.code == 0:  # `--help` / `--version` examples exit successfully
            return
        pytest.fail(f"{page}: `{command}` is refused by the CLI's parser (exit {exc.code})")


def test_site_builds_without_broken_links(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="install the [docs] extra (mkdocs-material) to build the site")
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is importable but its command is not on PATH"
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    # the benchmarks page is benchmarks/README.md included by pymdownx.snippets: its sections must be there
    assert "How it measures" in (tmp_path / "site" / "benchmarks" / "index.html").read_text(encoding="utf-8")
