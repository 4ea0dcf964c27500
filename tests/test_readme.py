"""The README's commands stay true: every `fire` command in its shell blocks parses with the real CLI,
and the "Protect your own model" commands run as written (on small image folders)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from fire_cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _shell_lines(text: str) -> list[str]:
    """Command lines of the README's ```bash blocks, continuations joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _fire_commands(text: str) -> list[list[str]]:
    out = []
    for line in _shell_lines(text):
        words = shlex.split(line, comments=True)
        if words and words[0] == "fire":
            out.append(words[1:])
    return out


COMMANDS = _fire_commands(README)


def test_the_readme_has_fire_commands():
    assert len(COMMANDS) > 25 and any(c[0] == "protect" for c in COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses(argv):
    args = build_parser().parse_args(argv)  # SystemExit (exit code 2) on an unrecognized or missing argument
    assert callable(args.func)


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    return README[start : README.index("\n## ", start + 1)]


def test_protect_your_own_model_runs_as_written(tmp_path):
    """The section's first block (minus `fire serve`, which runs until stopped), in a fresh directory
    holding `imgs/` and `flagged/` and the repository's `models/`."""
    from zoo.attacks import make_attack
    from zoo.data import load_dataset

    train = load_dataset("cifar10", "train").subset(260, seed=2)
    for i, img in enumerate(train.images[:200]):
        (tmp_path / "imgs" / str(train.labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "imgs" / str(train.labels[i]) / f"{i}.png")
    (tmp_path / "flagged").mkdir()
    for i, img in enumerate(make_attack("badnets").apply(train.images[200:])):
        Image.fromarray(img).save(tmp_path / "flagged" / f"{i}.png")
    (tmp_path / "models").symlink_to(ROOT / "models")
    block = re.search(r"```bash\n(.*?)```", _section("Protect your own model"), flags=re.S).group(1)
    env = {**os.environ, "PATH": f"{Path(shutil.which('fire')).parent}:{os.environ['PATH']}"}
    ran = 0
    for line in _shell_lines("```bash\n" + block + "```"):
        if line.startswith("fire serve"):
            continue
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        ran += 1
    assert ran == 2 and (tmp_path / "model_repository" / "model" / "config.pbtxt").is_file()


# Every measured figure in the README's tables comes from a committed file: a table with a decimal
# number names its sources in a comment just above it (`<!-- source: results/demo.md models/*/model.json -->`),
# and each of its decimal numbers must appear in them (to the precision the README prints).
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?![\w.])")


def _tables(text: str) -> list[tuple[int, list[str], list[str]]]:
    """(line number, source globs, body rows) of every markdown table."""
    lines, out, i = [x.strip() for x in text.splitlines()], [], 0  # tables in list items are indented
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            above = next((x for x in reversed(lines[max(0, i - 3) : i]) if x.strip()), "")
            m = re.fullmatch(r"<!-- source: (.+) -->", above.strip())
            out.append((i + 1, m.group(1).split() if m else [], lines[i + 2 : j]))
            i = j
        else:
            i += 1
    return out


def _backed(value: str, numbers: set[str]) -> bool:
    """``value`` as printed, from some number in the files (or a fraction there printed as a percentage)."""
    decimals = len(value.split(".")[1])
    v = value.lstrip("+")
    candidates = [float(x) for x in numbers] + [100 * float(x) for x in numbers if "." in x and abs(float(x)) <= 1]
    return any(f"{x:.{decimals}f}" == v or f"{x:+.{decimals}f}" == value for x in candidates)


def test_every_figure_in_a_readme_table_is_in_a_committed_file():
    problems = []
    for line, sources, rows in _tables(README):
        body = re.sub(r"`[^`]*`", "", "\n".join(rows))  # commands and names, not figures
        values = NUMBER.findall(body)
        if not values:
            continue
        files = [p for g in sources for p in sorted(ROOT.glob(g))]
        if not files:
            problems.append(f"README line {line}: a table of figures with no existing source ({sources or 'none'})")
            continue
        numbers = set(re.findall(r"[-+]?\d+(?:\.\d+)?", "\n".join(p.read_text() for p in files)))
        missing = sorted({v for v in values if not _backed(v, numbers)})
        if missing:
            problems.append(f"README line {line} ({', '.join(sources)}): not found {missing}")
    assert not problems, "\n".join(problems)
