"""mkdocs hooks: the pages show what the code and the committed results say, never a typed copy.

Directives, each alone on a line of a page:

- ``<!-- include: results/memory.md -->``: a committed results file, its title dropped (the page has one);
- ``<!-- csv: results/gateway_load.csv [columns=a,b,c] [where=col=value] -->``: a CSV as a table;
- ``<!-- cli -->``: the reference of every ``fire`` subcommand, from the argparse parsers themselves;
- ``<!-- models -->``: the bundled models, from their ``model.json`` and ``command.txt``.

The results' PNG plots are copied into the site under ``results/`` so pages can show them.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r"^<!-- (include|csv|cli|models)(?::\s*(\S+))?((?:\s+\w+=\S+)*)\s*-->$", re.M)


class DirectiveError(ValueError):
    pass


def _include(path: str, _opts: dict) -> str:
    text = (ROOT / path).read_text()
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    body = "\n".join(lines).strip()
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", body, flags=re.M)  # under the page's title


def csv_table(path: str, opts: dict) -> str:
    with (ROOT / path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DirectiveError(f"{path}: no rows")
    columns = opts["columns"].split(",") if "columns" in opts else list(rows[0])
    if "where" in opts:
        key, _, value = opts["where"].partition("=")
        rows = [r for r in rows if r.get(key) == value]
    unknown = [c for c in columns if c not in rows[0]]
    if unknown:
        raise DirectiveError(f"{path}: no column(s) {unknown}")
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(r[c] for c in columns) + " |" for r in rows)


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


def _cli(_path: str, _opts: dict) -> str:
    from fire_cli.main import build_parser

    out = []
    for path, parser in _leaves(build_parser()):
        out.append(f"### fire {' '.join(path)}\n\n{parser.description or ''}\n")
        rows = []
        for a in parser._actions:
            if a.dest == "help":
                continue
            name = ", ".join(a.option_strings) or a.dest
            default = "" if a.default in (None, False, [], argparse.SUPPRESS) or not a.option_strings else a.default
            text = (a.help or "").replace("%%", "%").replace("|", "\\|")
            shown = "required" if a.required else f"`{default}`" if default != "" else ""
            rows.append(f"| `{name}` | {text} | {shown} |")
        if rows:
            out.append("| flag | meaning | default |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


def _models(_path: str, _opts: dict) -> str:
    import json

    rows = ["| model | dataset | attack | CA % | ASR % | command |", "|---|---|---|---:|---:|---|"]
    for meta_file in sorted((ROOT / "models").glob("*/model.json")):
        meta, d = json.loads(meta_file.read_text()), meta_file.parent
        m = meta.get("metrics", {})
        command = (d / "command.txt").read_text().strip() if (d / "command.txt").is_file() else ""
        rows.append(f"| `{d.name}` | {meta.get('dataset', '')} | {meta.get('attack', {}).get('name', '')} | "
                    f"{100 * m['CA']:.2f} | {100 * m['ASR']:.2f} | `{command}` |")  # fmt: skip
    return "\n".join(rows)


RENDER = {"include": _include, "csv": csv_table, "cli": _cli, "models": _models}


def expand(markdown: str) -> str:
    def replace(m: re.Match) -> str:
        opts = dict(kv.split("=", 1) for kv in m.group(3).split())
        return RENDER[m.group(1)](m.group(2) or "", opts)

    return DIRECTIVE.sub(replace, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - the mkdocs hook signature
    return expand(markdown)


def on_files(files, config):
    for png in sorted((ROOT / "results").rglob("*.png")):
        files.append(File(str(png.relative_to(ROOT)), str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
