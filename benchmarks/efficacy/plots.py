"""The efficacy figures: PA and CA against the number of samples, CA/PA/ASR per defense, and the
features of clean and triggered images before and after the repair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks.efficacy.rows import headline
from fire_backend.repair import Repair


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_features(cache, directions, ev, path: Path, n: int = 400) -> None:
    """Clean vs triggered test features before and after repair, on two axes: the trigger direction b
    and the clean features' first principal direction orthogonal to it."""
    plt = _pyplot()
    repair = Repair(directions)
    x, t = cache.x[:n].reshape(min(n, len(cache.x)), -1), cache.t[:n].reshape(min(n, len(cache.t)), -1)
    b = repair.unit
    centred = x - x.mean(0)
    centred = centred - torch.outer(centred @ b, b)
    v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, sharey=True)
    for ax, title, edit in ((axes[0], "before repair", None), (axes[1], f"after FIRE ({directions.mode})", repair)):
        for feats, label, colour in ((x, "clean", "tab:blue"), (t, "triggered", "tab:red")):
            f = edit(feats.reshape(len(feats), *cache.x.shape[1:])).reshape(len(feats), -1) if edit else feats
            ax.scatter((f @ v).numpy(), (f @ b).numpy(), s=5, alpha=0.5, c=colour, label=label)
        ax.set_title(title)
        ax.set_xlabel("clean principal direction")
    axes[0].set_ylabel("trigger direction b")
    axes[0].legend()
    fig.suptitle(f"{path.stem.removeprefix('efficacy_features_')}: features after {cache.layer}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(rows: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    paths = []
    curve = [r for r in rows if r["group"] == "curve"]
    if curve:
        cols = min(4, len(models))
        grid_rows = (len(models) + cols - 1) // cols
        fig, axes = plt.subplots(grid_rows, cols, figsize=(4 * cols, 3.3 * grid_rows), squeeze=False)
        for ax, model in zip(axes.flat, models, strict=False):
            ca = next(r["CA"] for r in rows if r["model"] == model and r["defense"] == "none")
            for kind, style in (("offline", "o-"), ("streaming", "s--"), ("streaming unpaired", "^:")):
                sel = [r for r in curve if r["model"] == model and r["defense"] == kind]
                line = ax.plot([r["n_poisoned"] for r in sel], [r["PA"] for r in sel], style, label=f"PA {kind}")
                ax.plot([r["n_poisoned"] for r in sel], [r["CA"] for r in sel], style, color=line[0].get_color(),
                        alpha=0.35, lw=1, label=f"CA {kind}")  # fmt: skip
            ax.axhline(ca, color="grey", lw=1, ls=":", label="CA, no defense")
            ax.set_xscale("log")
            ax.set_title(model, fontsize=9)
            ax.set_xlabel("triggered calibration samples")
            ax.set_ylim(0, 100)
        for ax in list(axes.flat)[len(models) :]:
            ax.axis("off")
        axes.flat[0].set_ylabel("%")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "efficacy_pa_vs_n.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    defenses = list(dict.fromkeys(r["defense"] for r in rows if r["group"] == "headline"))
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 2.4 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        head = headline(rows, model)
        xs = np.arange(len(defenses))
        ax.bar(xs - 0.2, [head[d]["CA"] for d in defenses], 0.4, label="CA")
        ax.bar(xs + 0.2, [head[d]["PA"] for d in defenses], 0.4, label="PA")
        ax.plot(xs, [head[d]["ASR"] for d in defenses], "kx", label="ASR")
        ax.set_xticks(xs, defenses if ax is axes[-1, 0] else [""] * len(defenses), rotation=25, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel(model, fontsize=8)
    axes[0, 0].legend(ncol=3, fontsize=8)
    fig.tight_layout()
    paths.append(out / "efficacy_defenses.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
