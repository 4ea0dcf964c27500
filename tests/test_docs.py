"""The README and the documentation site stay true.

- every `fire` command in their shell blocks parses with the real CLI, and the README's "Protect your
  own model" commands run as written (on small image folders);
- every figure in a typed table (a cell that is a number) is the figure in the same row and column of
  the source the table names (`<!-- source: results/x.md -->` or a CSV), integers included; a mutation
  test swaps a figure for another figure of the same file and expects the check to fail;
- the site builds with `mkdocs build --strict` (tables of results are generated there, not typed);
- the README stays under 10 KB and no page speaks of issues or sessions.
"""

from __future__ import annotations

import csv
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fire_cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _shell_lines(text: str) -> list[str]:
    """Command lines of ```bash blocks, continuations joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


COMMANDS = [
    (page.relative_to(ROOT), words[1:])
    for page in PAGES
    for line in _shell_lines(page.read_text())
    if (words := shlex.split(line, comments=True)) and words[0] == "fire"
]


def test_the_docs_have_fire_commands():
    assert len(COMMANDS) > 30 and any(argv[0] == "protect" for _, argv in COMMANDS)


@pytest.mark.parametrize("page,argv", COMMANDS, ids=[f"{p}: {' '.join(a)[:50]}" for p, a in COMMANDS])
def test_every_command_in_the_docs_parses(page, argv):
    args = build_parser().parse_args(argv)  # SystemExit (exit code 2) on an unrecognized or missing argument
    assert callable(args.func)


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


@pytest.mark.integration
def test_protect_your_own_model_runs_as_written(tmp_path):
    """The README's block (minus `fire serve`, which runs until stopped), in a fresh directory holding
    `imgs/`, `flagged/` and the repository's `models/`."""
    from zoo.attacks import make_attack
    from zoo.data import load_dataset

    train = load_dataset("cifar10", "train").subset(160, seed=2)
    for i, img in enumerate(train.images[:120]):
        (tmp_path / "imgs" / str(train.labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "imgs" / str(train.labels[i]) / f"{i}.png")
    (tmp_path / "flagged").mkdir()
    for i, img in enumerate(make_attack("badnets").apply(train.images[120:])):
        Image.fromarray(img).save(tmp_path / "flagged" / f"{i}.png")
    (tmp_path / "models").symlink_to(ROOT / "models")
    block = re.search(r"```bash\n(.*?)```", _section(README.read_text(), "Protect your own model"), flags=re.S)
    env = {**os.environ, "PATH": f"{Path(shutil.which('fire')).parent}:{os.environ['PATH']}"}
    ran = 0
    for line in _shell_lines("```bash\n" + block.group(1) + "```"):
        if line.startswith("fire serve"):
            continue
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        ran += 1
    assert ran == 3 and (tmp_path / "model_repository" / "model" / "config.pbtxt").is_file()
    assert (tmp_path / "build" / "gateway" / "haproxy.cfg").is_file()


# -- figures: each typed cell against the same row and column of its source ---------------------------

FIGURE = re.compile(r"[-+]?\d[\d,]*(\.\d+)?")


def _clean(cell: str) -> str:
    return re.sub(r"[`*]", "", cell).strip()


def _markdown_tables(text: str) -> list[tuple[int, str | None, list[str], list[list[str]]]]:
    """(line, named source, header, rows) of every markdown table in ``text``."""
    lines, out, i = [x.strip() for x in text.splitlines()], [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            above = next((x for x in reversed(lines[max(0, i - 3) : i]) if x), "")
            m = re.fullmatch(r"<!-- source: (\S+) -->", above)

            def cells(row: str) -> list[str]:
                return [_clean(c) for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]

            out.append((i + 1, m.group(1) if m else None, cells(lines[i]), [cells(r) for r in lines[i + 2 : j]]))
            i = j
        else:
            i += 1
    return out


def _source_tables(path: Path) -> list[tuple[list[str], list[list[str]]]]:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        return [(rows[0], rows[1:])]
    return [(h, r) for _, _, h, r in _markdown_tables(path.read_text())]


def check_figures(text: str, where: str) -> list[str]:
    """Problems with the typed tables of ``text``: figures without a source, or not the source's."""
    problems = []
    for line, source, header, rows in _markdown_tables(text):
        figures = [(r, c) for r in rows for c, cell in enumerate(r) if c and FIGURE.fullmatch(cell)]
        if not figures:
            continue
        if source is None or not (ROOT / source).is_file():
            problems.append(f"{where}:{line}: a table of figures without an existing source ({source})")
            continue
        candidates = [(h, r) for h, r in _source_tables(ROOT / source) if set(header) <= set(h)]
        for row in rows:
            match = [(h, r) for h, rs in candidates for r in rs if r and r[h.index(header[0])] == row[0]]
            if not match:
                problems.append(f"{where}:{line}: row {row[0]!r} is not in {source}")
                continue
            h, src = match[0]
            for col, cell in enumerate(row):
                if col and FIGURE.fullmatch(cell) and src[h.index(header[col])] != cell:
                    problems.append(f"{where}:{line}: {row[0]!r} / {header[col]!r} is {cell}, {source} has "
                                    f"{src[h.index(header[col])]}")  # fmt: skip
    return problems


def test_every_figure_in_a_typed_table_is_its_sources():
    problems = [p for page in PAGES for p in check_figures(page.read_text(), str(page.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)
    assert any(s for _, s, _, _ in _markdown_tables(README.read_text())), "the README's headline table names its source"


def test_the_figure_check_catches_a_figure_moved_within_its_source():
    """Swap one figure of the README's headline table for another figure of the same source file."""
    text = README.read_text()
    tables = [t for t in _markdown_tables(text) if t[1]]
    rng = random.Random(0)
    for _ in range(20):
        _, source, _, rows = rng.choice(tables)
        row = rng.choice(rows)
        col = rng.choice([c for c, cell in enumerate(row) if c and FIGURE.fullmatch(cell)])
        others = sorted({c for _, rs in _source_tables(ROOT / source) for r in rs for c in r if FIGURE.fullmatch(c)}
                        - {row[col]})  # fmt: skip
        line = next(x for x in text.splitlines() if x.startswith(f"| {row[0]} ") or f"`{row[0]}`" in x)
        cells = line.split("|")
        cells[col + 1] = f" {rng.choice(others)} "
        mutated = text.replace(line, "|".join(cells), 1)
        assert check_figures(mutated, "README (mutated)"), f"a moved figure in {row[0]!r} went unnoticed"


# -- the site --------------------------------------------------------------------------------------


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "fire bench efficacy" in cli and "--max-ca-drop" in cli  # generated from the parsers


def test_the_readme_is_short_and_no_page_speaks_of_issues_or_sessions():
    assert len(README.read_bytes()) <= 10 * 1024
    included = [ROOT / p for page in PAGES for p in re.findall(r"<!-- include: (\S+) -->", page.read_text())]
    for page in [*PAGES, *included]:
        found = re.findall(r"\b(issues?|sessions?)\b", page.read_text(), flags=re.I)
        assert not found, f"{page.relative_to(ROOT)} mentions {found}"
