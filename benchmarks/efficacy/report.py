"""The efficacy report: the CSV, one markdown file per dataset and the overview."""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

from benchmarks.efficacy.config import EfficacyConfig
from benchmarks.efficacy.plots import plot_summary
from benchmarks.efficacy.rows import CSV_FIELDS, headline
from benchmarks.input_transforms import BASELINES
from zoo.checkpoint import clean_twins, load_meta


def _clean_twins(models_dir: Path) -> dict[tuple[str, str], tuple[str, float]]:
    """(dataset, arch) -> (model dir, CA) of clean models (poison rate 0) trained with the same recipe."""
    return {
        k: (name, 100 * load_meta(models_dir / name)["metrics"]["CA"]) for k, name in clean_twins(models_dir).items()
    }


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _targets(rows: list[dict]) -> list[str]:
    """Issue targets for auto-calibrated FIRE, per model (all-to-all excluded by design)."""
    out = [
        "| model | attack | CA none | CA auto | CA drop (<= 0.5) | ASR auto (<= 3) | PA auto | PA >= CA none - 3 "
        "| beats every input transform |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        head = headline(rows, model)
        none, auto = head["none"], head["FIRE auto"]
        drop = none["CA"] - auto["CA"]
        short = none["CA"] - 3 - auto["PA"]
        beaten = [b for b in BASELINES if not (auto["PA"] > head[b]["PA"] and auto["CA"] >= head[b]["CA"])]
        note = " (not a target: all-to-all)" if auto["attack"] == "badnets_all2all" else ""
        out.append(
            f"| {model}{note} | {auto['attack']} | {none['CA']:.2f} | {auto['CA']:.2f} | "
            f"{drop:.2f} {'ok' if drop <= 0.5 else 'MISS'} | "
            f"{auto['ASR']:.2f} {'ok' if auto['ASR'] <= 3 else 'MISS'} | "
            f"{auto['PA']:.2f} | {'ok' if short <= 0 else f'MISS by {short:.2f}'} | "
            f"{'ok' if not beaten else 'no: ' + ', '.join(beaten)} |"
        )
    return out


def write_report(rows: list[dict], cfg: EfficacyConfig, seconds: float, models_dir: Path) -> list[Path]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "efficacy.csv"]
    with written[0].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k]) for k in CSV_FIELDS})
    twins = _clean_twins(models_dir)
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset]
        lines = [
            f"# FIRE efficacy on {dataset}",
            "",
            f"`fire bench efficacy` ({', '.join(f'{k}={v}' for k, v in asdict(cfg).items() if k != 'auto')}); "
            f"evaluation time, summed over models, {seconds / 60:.1f} min on this machine (2 cores, shared with "
            f"other jobs while it ran). "
            f"Test split: every metric; training split: every "
            f"calibration sample. CA / ASR / PA in %. Headline FIRE rows use {cfg.n_poisoned} triggered samples.",
            "",
            "## The models",
            "",
            "| model | attack | CA | ASR | clean model, same recipe | its CA | CA gap (<= 3) | counts (ASR >= 90) |",
            "|---|---|---:|---:|---|---:|---:|---|",
        ]
        for model in dict.fromkeys(r["model"] for r in rs):
            meta = load_meta(models_dir / model)
            ca, asr = 100 * meta["metrics"]["CA"], 100 * meta["metrics"]["ASR"]
            twin, twin_ca = twins.get((dataset, meta["model"]["arch"]), ("-", float("nan")))
            gap = twin_ca - ca
            if asr < 90:
                ok = f"no (ASR {asr:.1f} < 90)"
            elif twin == "-":
                ok = "ASR yes; CA: no clean twin trained"
            else:
                ok = "yes" if gap <= 3 else f"no (CA gap {gap:.1f} > 3)"
            lines.append(f"| {model} | {meta['attack']['name']} | {ca:.2f} | {asr:.2f} | {twin} | {twin_ca:.2f} | "
                         f"{gap:.2f} | {ok} |")  # fmt: skip
        lines += ["", "## Targets (auto-calibrated FIRE)", "", *_targets(rs), ""]
        for group, title in (
            ("headline", "Defenses"),
            ("layer", "Ablation: layer x mode"),
            ("estimator", "Ablation: paired vs unpaired"),
            ("curve", "Ablation: number of triggered calibration samples"),
            ("multilayer", "One layer vs two"),
        ):
            sel = [r for r in rs if r["group"] == group]
            if not sel:
                continue
            lines += [f"## {title}", "", "| model | defense | layer | mode | alpha | rank | n | CA | ASR | PA |"]
            lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
            for r in sel:
                lines.append(
                    f"| {r['model']} | {r['defense']} | {r['layer']} | {r['mode']} | {_fmt(r['alpha'])} | "
                    f"{r['rank']} | {r['n_poisoned']} | {r['CA']:.2f} | {r['ASR']:.2f} | {r['PA']:.2f} |"
                )
            lines.append("")
        path = out / f"efficacy_{dataset}.md"
        path.write_text("\n".join(lines))
        written.append(path)
    written.append(_overview(rows, out / "efficacy.md", seconds))
    if cfg.plots:
        written += plot_summary(rows, out)
    return written


def _overview(rows: list[dict], path: Path, seconds: float) -> Path:
    """One line per model: no defense, auto-calibrated FIRE, the best input transform (by PA)."""
    lines = [
        "# FIRE efficacy: overview",
        "",
        f"Every model, the whole test split unless limited, "
        f"{max(r['n_poisoned'] for r in rows if r['defense'] == 'FIRE auto')} triggered calibration samples; "
        f"evaluation time {seconds / 60:.1f} min. CA / ASR / PA in %. "
        "Per-dataset tables with every defense and ablation: efficacy_<dataset>.md.",
        "",
        "| model | attack | none CA / ASR / PA | FIRE auto: setting | FIRE auto CA / ASR / PA "
        "| best input transform | its CA / ASR / PA |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        head = headline(rows, model)
        none, auto = head["none"], head["FIRE auto"]
        best = max((head[b] for b in BASELINES), key=lambda r: r["PA"])
        trio = lambda r: f"{r['CA']:.2f} / {r['ASR']:.2f} / {r['PA']:.2f}"  # noqa: E731
        setting = f"{auto['mode']} @{auto['layer']}, alpha {auto['alpha']}, rank {auto['rank']}"
        lines.append(
            f"| {model} | {auto['attack']} | {trio(none)} | {setting} | {trio(auto)} | {best['defense']} "
            f"| {trio(best)} |"
        )
    path.write_text("\n".join(lines) + "\n")
    return path
