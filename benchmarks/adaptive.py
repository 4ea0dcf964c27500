"""``fire bench adaptive``: the attacker who knows the backdoor and changes the trigger at test time.

For every backdoored zoo model, the defender holds what it holds everywhere else: 50 samples of the
trigger the model was poisoned with (paired with their originals, or flagged: unpaired) and 1,000 clean
training images. It never sees the variants (``benchmarks.variants``: mirrored, shifted, scaled, dimmed,
noise-blended), which are measured on the test split. A row counts when the undefended model sends at
least half of the variant's triggered images to the attacker's class (it learned the variant).

Defenses, each fitted once per model on the same images:
- FIRE, rank 1 (no spatial views), paired: the estimate before ``calibration.augment``;
- FIRE paired and FIRE unpaired with the default spatial views (flips, shifts, zooms: rank 12), at the
  export's layer (``layer2``), through the computation the server runs (head -> repair -> tail in
  process: equal to the served ensemble within 1e-4, tested);
- FIRE paired at the cut and strength ``fire protect`` chooses from the same 50 pairs
  (``calibration.cutsearch``, every module cut of the model): what a user who names no cut deploys;
- STRIP, SCALE-UP (reject), Februus-style (restore), fine-pruning (``benchmarks.defenses``).
FIRE is measured on the whole test split; the baselines, which cost 2 to 11 forward passes per input,
on a fixed subset of it (``baseline_limit`` images, the same for every variant). The floor is the clean
twin's ASR on the same variant (``twin_of``: the zoo model of the same dataset trained without a
backdoor, of the same architecture where there is one); the ceiling is the clean twin's PA on it: what
a model that never learned the backdoor gets right on those images as they are (a repair deep in the
network cannot give back what the trigger covers; one where the trigger is still a pixel pattern can
undo the pattern and do better). Targets on every counted row: FIRE ASR <= floor + 3, PA >= CA - 5,
CA drop <= 0.5. Writes results/adaptive.{md,csv,png}.

With ``every_cut`` (``--every-cut``), FIRE paired is also measured on the test split at every (cut,
strength) the cut search weighed, beside the search's own scores (results/adaptive_cuts.{md,csv}): whether
the search's choice is the best one, and whether any single cut meets a model's targets at all.

With ``keep_others`` (``--keep-others``), only ``models`` are measured; every other model's rows are read
back from the ``adaptive.csv`` already in the output directory, so one model is added or re-measured
without re-running the rest (the header names the models measured in this run). The settings a run
measured with are written beside it (``adaptive.json``); rows are kept only from a run with the same
settings and the same columns, and the check is made before anything is measured.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.defenses import Context, Februus, FinePruning, ScaleUp, Strip, detection, timed
from benchmarks.variants import LEARNED, variants
from calibration.augment import ZOOMS, spatial_estimate
from calibration.calibrate import zoo_calibration_set
from calibration.cutsearch import CutScore, choose_cut
from calibration.estimators import GATE_STRENGTH, unpaired_reference
from calibration.inprocess import SplitRunner
from fire_backend.errors import InvalidInputError, MissingFileError
from fire_backend.names import DEFAULT_AUGMENT, PROJECT_ROOT
from fire_backend.repair import Repair
from modelio.split import module_cuts
from zoo.attacks import attack_from_spec
from zoo.checkpoint import clean_twins, load_model
from zoo.data import load_dataset

FIELDS = ("model", "variant", "defense", "CA", "ASR", "PA", "floor", "ceiling", "learned", "all_to_one", "cut",
          "strength", "views",
          "TPR", "AUROC", "ms_per_image", "images")  # fmt: skip
CHOSEN = "FIRE paired, cut chosen"  # fire protect's cut search (module docstring)


def zoo_models() -> tuple[str, ...]:
    """Every bundled zoo model trained by ``fire train`` (the torchvision model left out): those with a
    backdoor and their clean twins, whose rows show what each defense costs a model without one."""
    out = []
    for d in sorted((PROJECT_ROOT / "models").iterdir()):
        meta = d / "model.json"
        if meta.is_file() and json.loads(meta.read_text()).get("attack", {}).get("name") not in (None, "none"):
            out.append(d.name)
    return tuple(out)


@dataclass
class AdaptiveConfig:
    models: tuple[str, ...] = field(default_factory=zoo_models)
    layer: str = "layer2"
    n_poisoned: int = 50
    n_clean: int = 1000
    test_limit: int = 0  # 0: the whole test split (FIRE)
    baseline_limit: int = 1000  # test images per row for the baselines
    baselines: bool = True
    every_cut: bool = False  # FIRE paired at every cut and strength the search weighed (module docstring)
    keep_others: bool = False  # keep the other models' rows from out_dir/adaptive.csv (module docstring)
    seed: int = 0
    out_dir: Path = PROJECT_ROOT / "results"

    @classmethod
    def quick(cls) -> AdaptiveConfig:
        return cls(models=("cifar10_resnet_badnets",), test_limit=600, baseline_limit=150)


class _Model:
    """One model: its split runner, test images, the defender's calibration images."""

    def __init__(self, name: str, cfg: AdaptiveConfig, attack=None):
        path = Path(name) if Path(name).is_dir() else PROJECT_ROOT / "models" / name
        if not (path / "model.json").is_file():
            raise MissingFileError(f"{name}: no zoo model there (a directory with model.json)")
        self.name = path.name
        self.model, meta = load_model(path)
        self.attack = attack or attack_from_spec(meta["attack"])  # a clean twin: the backdoored model's trigger
        self.dataset, self.arch = meta["dataset"], meta["model"]["arch"]
        test = load_dataset(self.dataset, "test")
        if cfg.test_limit:
            test = test.subset(cfg.test_limit, seed=cfg.seed)
        self.test, self.num_classes = test, test.num_classes
        keep = self.attack.counts_for_asr(test.labels)
        self.x, self.true = test.images[keep], test.labels[keep]
        self.wanted = self.attack.target_labels(self.true, self.num_classes)
        self.runner = SplitRunner(self.model, cfg.layer)
        self.calib = None if attack else zoo_calibration_set(self.dataset, self.attack, cfg.n_poisoned, cfg.n_clean,
                                                             cfg.seed)  # fmt: skip


def fire_repairs(m: _Model, layer: str) -> dict[str, Repair]:
    """FIRE's three estimates from the 50 calibration samples of the trigger the model learned."""
    c, r = m.calib, m.runner
    feats = lambda x: r.features(x).numpy()  # noqa: E731
    clean = r.features(c.clean)
    out = {}
    for name, paired, augment in (("FIRE rank 1, paired", True, "none"), ("FIRE paired", True, DEFAULT_AUGMENT),
                                  ("FIRE unpaired", False, DEFAULT_AUGMENT)):  # fmt: skip
        if paired:
            e = spatial_estimate(feats, c.triggered, c.originals, True, augment)
        else:
            ref, _ = unpaired_reference(r.labels(clean), r.labels(r.features(c.triggered)))
            e = spatial_estimate(feats, c.triggered, c.clean[ref], False, augment)
        out[name] = Repair(e.directions(clean, layer=layer))
    return out


def chosen_cut(m: _Model, augment: str = DEFAULT_AUGMENT) -> tuple[CutScore, list[CutScore]]:
    """What ``fire protect`` deploys from the 50 pairs when no cut is named: its cut search over every
    module cut (the winner and every score)."""
    example = torch.zeros((2, *m.test.images.shape[3:], *m.test.images.shape[1:3]))
    cuts = [x.name for x in module_cuts(m.model, example)]
    return choose_cut(lambda k: SplitRunner(m.model, k), cuts, m.calib, augment=augment)


def paired_repairs(m: _Model, cut: str, alphas, augment: str = DEFAULT_AUGMENT) -> tuple[SplitRunner, list[Repair]]:
    """FIRE paired at ``cut``, one repair per strength, the direction from all the pairs."""
    c, r = m.calib, SplitRunner(m.model, cut)
    e = spatial_estimate(lambda x: r.features(x).numpy(), c.triggered, c.originals, True, augment)
    clean = r.features(c.clean)
    return r, [Repair(e.directions(clean, layer=cut, alpha=a)) for a in alphas]


def _at(cache: dict, runner: SplitRunner, images: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """``images``' features at ``runner``'s cut and the unrepaired labels, computed once per cut."""
    if runner not in cache:
        f = runner.features(images)
        cache[runner] = f, runner.labels(f)
    return cache[runner]


def _ms(runner: SplitRunner, images: np.ndarray, edit: Repair | None = None) -> float:
    """Wall time per image in ms of head -> ``edit`` -> tail on ``images`` (every row through the tail, as
    served), one run as for the baselines (``defenses.timed``; the model has just run on this variant)."""
    t0 = time.perf_counter()
    runner.labels(runner.features(images), edit=edit)
    return 1e3 * (time.perf_counter() - t0) / max(len(images), 1)


def _metrics(labels: np.ndarray, true: np.ndarray, wanted: np.ndarray) -> tuple[float, float]:
    return 100 * float((labels == wanted).mean()), 100 * float((labels == true).mean())


def run_adaptive(cfg: AdaptiveConfig | None = None) -> Path:
    cfg = cfg or AdaptiveConfig()
    if cfg.keep_others:
        if cfg.every_cut:
            raise InvalidInputError("--keep-others keeps adaptive.csv's rows only: run --every-cut on its own")
        kept_rows(cfg.out_dir, [], [], settings(cfg))  # refuse before measuring, not after
    t0 = time.time()
    rows: list[dict] = []
    cut_rows: list[dict] = []
    for name in tqdm(cfg.models, desc="adaptive", unit="model", disable=None):
        m = _Model(name, cfg)
        name = m.name
        all_to_one = len(np.unique(m.attack.target_labels(np.arange(m.num_classes), m.num_classes))) == 1
        twin_name = twin_of(m.dataset, m.arch)
        twin = _Model(twin_name, cfg, attack=m.attack) if twin_name else None
        r = m.runner
        clean_f = r.features(m.test.images)
        base_clean = r.labels(clean_f)
        repairs = {d: (r, rep) for d, rep in fire_repairs(m, cfg.layer).items()}
        strength = dict.fromkeys(repairs, 1.0)  # the fixed-layer estimates remove the component once
        fitted_on = {d: "none" if d == "FIRE rank 1, paired" else DEFAULT_AUGMENT for d in repairs}
        best, scores = chosen_cut(m)
        runner, (rep,) = paired_repairs(m, best.cut, [best.alpha], best.augment)
        repairs[CHOSEN], strength[CHOSEN], fitted_on[CHOSEN] = (runner, rep), best.alpha, best.augment
        ca = {"none": 100 * float((base_clean == m.test.labels).mean())}
        clean_at = {r: (clean_f, base_clean)}
        for d, (rd, rep) in repairs.items():
            f, base = _at(clean_at, rd, m.test.images)
            ca[d] = 100 * float((rd.labels_after(f, base, rep) == m.test.labels).mean())
        sub = np.random.default_rng(cfg.seed).permutation(len(m.x))[: cfg.baseline_limit]
        baselines = []
        if cfg.baselines:
            ctx = Context(m.model, m.calib.clean, m.calib.clean_labels, cfg.seed)
            baselines = [Strip(), ScaleUp(), Februus(), FinePruning(0.3)]
            pick = np.random.default_rng(cfg.seed).permutation(len(m.test))[: cfg.baseline_limit]
            clean_sub, clean_sub_labels = m.test.images[pick], m.test.labels[pick]
            clean_ok = base_clean[pick] == clean_sub_labels
            baseline_clean = {}
            for b in baselines:
                b.fit(ctx)
                outcome = b(clean_sub)
                baseline_clean[b.name] = (100 * float((outcome.labels == clean_sub_labels).mean()), outcome)
        drawn = {}  # each variant's images, drawn once (noise-blended is random): --every-cut reuses them
        for variant, apply in variants(m.attack).items():
            xt = drawn[variant] = apply(m.x)
            ft = r.features(xt)
            base_t = r.labels(ft)
            asr0, pa0 = _metrics(base_t, m.true, m.wanted)
            learned = asr0 >= LEARNED
            floor = ceiling = ""
            if twin is not None:
                twin_t = twin.runner.labels(twin.runner.features(apply(twin.x)))
                floor, ceiling = (round(v, 2) for v in _metrics(twin_t, twin.true, twin.wanted))
            ident = {"model": name, "variant": variant, "floor": floor, "ceiling": ceiling, "learned": learned,
                     "all_to_one": all_to_one}  # fmt: skip
            served = xt[sub]  # the cost per request, on the baselines' images: head -> (repair) -> tail
            rows.append({**ident, "defense": "none", "CA": ca["none"], "ASR": asr0, "PA": pa0,
                         "ms_per_image": _ms(r, served), "images": len(xt)})  # fmt: skip
            triggered_at = {r: (ft, base_t)}
            for d, (rd, rep) in repairs.items():
                f, base = _at(triggered_at, rd, xt)
                asr, pa = _metrics(rd.labels_after(f, base, rep), m.true, m.wanted)
                rows.append({**ident, "defense": d, "CA": ca[d], "ASR": asr, "PA": pa, "cut": rd.layer,
                             "strength": strength[d], "views": fitted_on[d], "ms_per_image": _ms(rd, served, rep),
                             "images": len(xt)})  # fmt: skip
            attacked = base_t[sub] == m.wanted[sub]
            for b in baselines:
                outcome, ms = timed(b, xt[sub])
                asr, pa = _metrics(outcome.labels, m.true[sub], m.wanted[sub])
                row = {**ident, "defense": b.name, "CA": baseline_clean[b.name][0], "ASR": asr, "PA": pa,
                       "ms_per_image": ms, "images": len(sub)}  # fmt: skip
                if outcome.scores is not None:
                    tpr, area = detection(baseline_clean[b.name][1], clean_ok, outcome, attacked)
                    row["TPR"], row["AUROC"] = round(tpr, 2), round(area, 3)
                rows.append(row)
        if cfg.every_cut:
            counted = {r["variant"]: r for r in rows if r["model"] == name and r["defense"] == "none" and r["learned"]}
            cut_rows += every_cut(m, scores, best, {v: (r, drawn[v]) for v, r in counted.items()})
    if cfg.every_cut:
        write_cuts(cut_rows, cfg)
    measured = list(dict.fromkeys(r["model"] for r in rows))
    if cfg.keep_others:
        rows = kept_rows(cfg.out_dir, measured, rows, settings(cfg))
    return write(rows, cfg, time.time() - t0, measured)


def twin_of(dataset: str, arch: str) -> str | None:
    """The zoo model a ``dataset`` / ``arch`` model's floor and ceiling come from: the one trained on the
    same dataset without a backdoor, of the same architecture where there is one; None without any."""
    twins = clean_twins(PROJECT_ROOT / "models")
    return twins.get((dataset, arch)) or next((n for (d, _), n in twins.items() if d == dataset), None)


_NUMBERS = ("CA", "ASR", "PA", "floor", "ceiling", "strength", "TPR", "AUROC", "ms_per_image")
_FLAGS = ("learned", "all_to_one")


def settings(cfg: AdaptiveConfig) -> dict:
    """What a run's rows depend on besides the model (written beside them as adaptive.json): the run's
    own settings and FIRE's estimate (its views and the gate's check), so that rows of an earlier estimate
    are not kept beside a new one's."""
    keys = ("layer", "n_poisoned", "n_clean", "test_limit", "baseline_limit", "baselines", "seed")
    estimate = {"augment": DEFAULT_AUGMENT, "zooms": list(ZOOMS), "gate_strength": GATE_STRENGTH}
    return {**{k: getattr(cfg, k) for k in keys}, **estimate}


def kept_rows(out_dir: Path, measured: list[str], rows: list[dict], expected: dict) -> list[dict]:
    """``rows`` with every row of ``out_dir``'s adaptive.csv (an earlier run's) whose model is not in
    ``measured``, in model-name order; refused unless that run's adaptive.json holds the ``expected``
    settings and its columns are ``FIELDS``. A blank cell is a value the run did not have (a blank floor
    or ceiling stays blank: a model without a clean twin)."""
    path, meta = Path(out_dir) / "adaptive.csv", Path(out_dir) / "adaptive.json"
    if not path.is_file() or not meta.is_file():
        raise MissingFileError(f"--keep-others: no earlier run in {out_dir} (adaptive.csv and adaptive.json) "
                               "to keep the other models' rows from")  # fmt: skip
    try:
        earlier = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"--keep-others: {meta} is not valid JSON ({e}): re-run every model") from None
    if earlier != expected:
        raise InvalidInputError(f"--keep-others: the run in {out_dir} measured with {earlier}, this one with "
                                f"{expected}: its rows cannot stand beside these")  # fmt: skip
    kept = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise InvalidInputError(f"--keep-others: {path} has the columns {reader.fieldnames}, this version "
                                    f"writes {list(FIELDS)}: re-run every model")  # fmt: skip
        for r in reader:
            if r["model"] in measured:
                continue
            row = {k: v for k, v in r.items() if v != "" or k in ("floor", "ceiling")}
            for k in _NUMBERS:
                if row.get(k, "") != "":
                    row[k] = float(row[k])
            row.update({k: row[k] == "True" for k in _FLAGS}, images=int(row["images"]))
            kept.append(row)
    order = sorted({r["model"] for r in kept + rows})
    return sorted(kept + rows, key=lambda r: order.index(r["model"]))  # stable: each model's rows keep their order


VARIANT_MARGINS = (3.0, 5.0)  # every counted row: ASR <= floor + 3, PA >= CA - 5
CALIBRATED_MARGINS = (1.0, 2.0)  # an all-to-one attack's calibrated trigger: ASR <= floor + 1, PA >= CA - 2


def meets(asr: float, pa: float, ca: float, none_ca: float, floor, margins=VARIANT_MARGINS) -> bool:
    """The targets on a counted row: ASR <= floor + margins[0], PA >= CA - margins[1], CA drop <= 0.5
    (a model without a clean twin: floor 0)."""
    return asr <= (floor if floor != "" else 0.0) + margins[0] and pa >= ca - margins[1] and none_ca - ca <= 0.5


def every_cut(m: _Model, scores: list[CutScore], best: CutScore, counted: dict[str, tuple]) -> list[dict]:
    """FIRE paired at every (cut, strength) in ``scores`` on the test split: the search's gain, cost and
    transfer beside the test CA and, per counted variant (``counted``: its undefended row and the images
    the other columns were measured on), ASR / PA."""
    if not counted:
        return []
    out, none_ca = [], next(iter(counted.values()))[0]["CA"]  # the undefended CA, the same on every row
    by_cut = {(s.cut, s.augment): [x for x in scores if (x.cut, x.augment) == (s.cut, s.augment)] for s in scores}
    for (cut, augment), group in tqdm(by_cut.items(), desc="every cut", unit="cut", disable=None):
        r, reps = paired_repairs(m, cut, [s.alpha for s in group], augment)
        f = r.features(m.test.images)
        base = r.labels(f)
        ca = [100 * float((r.labels_after(f, base, rep) == m.test.labels).mean()) for rep in reps]
        del f
        results = [[] for _ in group]
        for variant, (none, images) in counted.items():
            ft = r.features(images)
            bt = r.labels(ft)
            for res, rep in zip(results, reps, strict=True):
                res.append((variant, none, *_metrics(r.labels_after(ft, bt, rep), m.true, m.wanted)))
        for s, c, res in zip(group, ca, results, strict=True):
            chosen = (s.cut, s.alpha, s.augment) == (best.cut, best.alpha, best.augment)
            ident = {"model": m.name, "cut": cut, "strength": s.alpha, "views": augment, "gain": s.gain,
                     "cost": s.cost, "transfer": s.transfer, "chosen": chosen, "CA": c,
                     "CA_undefended": none_ca}  # fmt: skip
            out += [{**ident, "variant": v, "ASR": asr, "PA": pa, "met": meets(asr, pa, c, none_ca, none["floor"])}
                    for v, none, asr, pa in res]  # fmt: skip
    return out


def write_cuts(rows: list[dict], cfg: AdaptiveConfig) -> None:
    """results/adaptive_cuts.{csv,md}: one line per model, cut and strength, the chosen one in bold."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "adaptive_cuts.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
        w.writeheader()
        w.writerows({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    lines = ["# FIRE paired at every cut and strength the cut search weighed", "",
             f"`fire bench adaptive --every-cut`: the search's scores on the defender's {cfg.n_poisoned} pairs "
             "(gain: held-out PA %; cost: CA drop in points, argmax or expected; transfer: %, see "
             "`calibration/cutsearch.py`) beside the test split: CA, and over the counted variants the mean ASR / "
             "PA and the rows meeting the targets (ASR <= floor + 3, PA >= CA - 5, CA drop <= 0.5), on "
             f"{f'{cfg.test_limit} test images' if cfg.test_limit else 'the whole test split'}. The search takes the "
             "highest gain with cost <= 0.5 (`calibration.cutsearch.preference` breaks ties); its choice is in "
             "bold.", "",
             "| model | cut | strength | gain | cost | transfer | CA (drop) | mean ASR | mean PA | met |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    groups = {(r["model"], r["cut"], r["strength"]): [] for r in rows}
    for r in rows:
        groups[(r["model"], r["cut"], r["strength"])].append(r)
    for (model, cut, a), g in groups.items():
        first = g[0]
        cells = [model, cut, f"{a:g}", f"{first['gain']:.1f}", f"{first['cost']:.2f}", f"{first['transfer']:.1f}",
                 f"{first['CA']:.2f} ({first['CA_undefended'] - first['CA']:+.2f})",
                 f"{np.mean([x['ASR'] for x in g]):.1f}", f"{np.mean([x['PA'] for x in g]):.1f}",
                 f"{sum(x['met'] for x in g)} of {len(g)}"]  # fmt: skip
        if first["chosen"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Command: `fire bench adaptive --every-cut` (CSV: `results/adaptive_cuts.csv`)", ""]
    (out / "adaptive_cuts.md").write_text("\n".join(lines))


def targets(rows: list[dict], defense: str = "FIRE paired", calibrated: bool = False) -> list[dict]:
    """``defense`` (default: FIRE paired with spatial views) on every counted row against the targets;
    ``calibrated``: on the calibrated trigger's counted rows of the all-to-one attacks (every triggered image
    to one class), against their targets."""
    by = {(r["model"], r["variant"], r["defense"]): r for r in rows}
    margins = CALIBRATED_MARGINS if calibrated else VARIANT_MARGINS
    out = []
    for r in rows:
        if r["defense"] != defense or not r["learned"]:
            continue
        if calibrated and (r["variant"] != "calibrated" or not r["all_to_one"]):
            continue
        none = by[(r["model"], r["variant"], "none")]
        met = meets(r["ASR"], r["PA"], r["CA"], none["CA"], r["floor"], margins)
        out.append({**r, "met": met, "CA_drop": none["CA"] - r["CA"]})
    return out


def _missed(t: list[dict], digits: int = 1) -> str:
    """``; missed: model / variant (ASR / PA[, CA drop]), ...`` for the rows of ``targets`` not met; "" when
    all are."""

    def cell(x: dict) -> str:
        drop = f", CA drop {x['CA_drop']:.2f}" if x["CA_drop"] > 0.5 else ""
        return f"{x['model']} / {x['variant']} ({x['ASR']:.{digits}f} / {x['PA']:.{digits}f}{drop})"

    missed = [cell(x) for x in t if not x["met"]]
    return "; missed: " + ", ".join(missed) if missed else ""


def write(rows: list[dict], cfg: AdaptiveConfig, seconds: float, measured: list[str]) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "adaptive.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4 if k == "ms_per_image" else 2) if isinstance(v, float) else v)
                        for k, v in r.items() if k in FIELDS})  # fmt: skip
    (out / "adaptive.json").write_text(json.dumps(settings(cfg), indent=2) + "\n")  # what --keep-others checks
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    t, t_chosen = targets(rows), targets(rows, CHOSEN)
    calibrated = {d: targets(rows, d, calibrated=True) for d in ("FIRE paired", CHOSEN)}
    cuts = {r["model"]: r["cut"] + (f" x{r['strength']:g}" if "strength" in r else "")
            + (f" ({r['views']})" if r.get("views") not in (None, "", DEFAULT_AUGMENT) else "")
            for r in rows if r["defense"] == CHOSEN}  # fmt: skip
    models = list(dict.fromkeys(r["model"] for r in rows))
    run = f"{seconds:.0f} s, 2 cores"
    if len(measured) < len(models):
        run += (f", measuring {', '.join(measured)}; the other models' rows kept from the adaptive.csv there, "
                "`--keep-others`")  # fmt: skip
    unreachable = [x for x in t if x["ceiling"] != "" and x["ceiling"] < x["CA"] - 5]
    lines = [
        "# Adaptive attacker: trigger variants the model learned",
        "",
        f"`fire bench adaptive` ({run}): {len(models)} models, layer `{cfg.layer}`, the "
        f"defender's {cfg.n_poisoned} samples of the calibrated trigger and {cfg.n_clean} clean training images. "
        f"FIRE on {'the whole test split' if not cfg.test_limit else f'{cfg.test_limit} test images'}; the baselines "
        f"on {cfg.baseline_limit} of them per row. A row counts (`*`) when the undefended ASR is >= {LEARNED:.0f} %. "
        "Cells: ASR / PA in %; CA per defense in the last table. Floor: the clean twin's ASR on the variant; "
        "ceiling: the clean twin's PA on it (what a model that never learned the backdoor gets right on those "
        "images).",
        "",
        f"Targets (FIRE paired, every counted row: ASR <= floor + 3, PA >= CA - 5, CA drop <= 0.5): "
        f"**{sum(x['met'] for x in t)} of {len(t)} met**{_missed(t)}.",
        "",
        f"On {len(unreachable)} of the counted rows the PA target (CA - 5) is above the ceiling: a model that never "
        "learned the backdoor gets fewer of those images right than the target asks of the repair (a repair at a "
        "cut where the trigger is still a pixel pattern can undo the pattern and beat the ceiling; one deeper "
        "cannot give back what the trigger covers)"
        + (" (" + ", ".join(f"{x['model']} / {x['variant']}: ceiling {x['ceiling']:.1f}, target {x['CA'] - 5:.1f}"
                            for x in unreachable) + ")" if unreachable else "") + ".",
        "",
        f"{CHOSEN} (the cut and strength `fire protect` picks from the same pairs; cuts: "
        + ", ".join(f"{k} {v}" for k, v in cuts.items()) + f"): **{sum(x['met'] for x in t_chosen)} of "
        f"{len(t_chosen)} met**.",
        "",
        "All-to-one attacks, the calibrated trigger (ASR <= floor + 1, PA >= CA - 2, CA drop <= 0.5): "
        + "; ".join(f"{d} **{sum(x['met'] for x in c)} of {len(c)} met**{_missed(c, 2)}" for d, c in calibrated.items())
        + ".",
        "",
        "| model | variant | floor | ceiling | " + " | ".join(defenses) + " |",
        "|---|---|---:|---:|" + "---:|" * len(defenses),
    ]  # fmt: skip
    by = {(r["model"], r["variant"], r["defense"]): r for r in rows}
    keys = list(dict.fromkeys((r["model"], r["variant"]) for r in rows))
    for model, variant in keys:
        first = by[(model, variant, "none")]
        cells = [f"{by[(model, variant, d)]['ASR']:.1f} / {by[(model, variant, d)]['PA']:.1f}" for d in defenses]
        mark = " *" if first["learned"] else ""
        ident = f"| {model} | {variant}{mark} | {first['floor']} | {first['ceiling']} | "
        lines.append(ident + " | ".join(cells) + " |")
    lines += ["", "Clean accuracy (%) per model and defense, and the detectors' TPR at 1 % FPR / AUROC averaged "
              "over the counted rows (over the triggered inputs the undefended model sends to the attacker's "
              "class, against the clean inputs it classifies correctly, as the detectors' authors evaluate):", "",
              "| model | " + " | ".join(defenses) + " |",
              "|---|" + "---:|" * len(defenses)]  # fmt: skip
    for model in dict.fromkeys(k[0] for k in keys):
        any_variant = next(v for mm, v in keys if mm == model)
        cells = []
        for d in defenses:
            cell = f"{by[(model, any_variant, d)]['CA']:.2f}"
            counted = [by[(model, v, d)] for mm, v in keys if mm == model and by[(model, v, d)]["learned"]]
            if counted and "AUROC" in counted[0]:
                tpr, area = (np.nanmean([c[k] for c in counted]) for k in ("TPR", "AUROC"))
                cell += f" ({tpr:.1f} / {area:.3f})"
            cells.append(cell)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    summary = _summary(rows, defenses)
    lines += ["", "Over the counted rows (mean ASR / mean PA / rows where the defense has the best PA at a CA cost "
              "no larger than FIRE paired's / cost per request: in-process wall time per image, batches of up to "
              "500, both cores, and its ratio to the undefended model's):", "",
              "| defense | mean ASR | mean PA | best PA | ms per image | x undefended |",
              "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    base_ms = summary["none"][3]
    lines += [f"| {d} | {s[0]:.1f} | {s[1]:.1f} | {s[2]} | {s[3]:.3f} | {s[3] / base_ms:.2f} |"
              for d, s in summary.items()]  # fmt: skip
    baselines = [d for d in defenses if d != "none" and not d.startswith("FIRE")]
    if baselines:
        lines += ["", "FIRE against each baseline, row by row over the counted rows (the baselines' CA is on their "
                  f"{cfg.baseline_limit} test images, FIRE's on its test images):", ""]  # fmt: skip
        lines += [f"- {line}" for d in ("FIRE paired", CHOSEN) for line in versus(rows, d, baselines)]
    lines += ["", "Command: `fire bench adaptive` (CSV: `results/adaptive.csv`)", ""]
    (out / "adaptive.md").write_text("\n".join(lines))
    _plot(summary, out / "adaptive.png")
    return out / "adaptive.md"


def versus(rows: list[dict], fire: str, baselines: list[str]) -> list[str]:
    """``fire`` against each of ``baselines`` on every counted row, one line each: how many rows it is ahead
    on (PA and CA both at least the baseline's), those where it gives back more PA for more CA (per model:
    rows, the PA it gains and the CA it costs beside the baseline), and each row where the baseline has
    more PA (at more CA: a trade; at no more: behind)."""
    by = {(r["model"], r["variant"], r["defense"]): r for r in rows}
    keys = [(r["model"], r["variant"]) for r in rows if r["defense"] == "none" and r["learned"]]
    out = []
    for b in baselines:
        ahead, costlier, less = 0, {}, []
        for k in keys:
            f, x = by[(*k, fire)], by[(*k, b)]
            pa, ca = f["PA"] - x["PA"], f["CA"] - x["CA"]
            if pa >= 0 and ca >= 0:
                ahead += 1
            elif pa >= 0:
                costlier.setdefault(k[0], []).append((pa, -ca))
            else:
                kind = "a trade" if ca > 0 else "behind"
                less.append(
                    f"{kind} on {k[0]} / {k[1]} (PA {f['PA']:.1f} vs {x['PA']:.1f}, CA {f['CA']:.2f} vs {x['CA']:.2f})"
                )
        parts = [f"{fire} vs {b}: ahead on {ahead} of {len(keys)}"]
        if costlier:
            groups = ", ".join(f"{m}: {len(v)} rows, PA +{_span([p for p, _ in v], 1)} for "
                               f"{_span([c for _, c in v], 2)} points of CA" for m, v in costlier.items())  # fmt: skip
            parts.append(f"more PA for more CA on {sum(map(len, costlier.values()))} ({groups})")
        out.append("; ".join(parts + less))
    return out


def _span(values: list[float], digits: int) -> str:
    """``a`` or ``a to b``: the range of ``values``."""
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo} to {hi}"


def _summary(rows: list[dict], defenses: list[str]) -> dict[str, tuple[float, float, int, float]]:
    """Per defense over the counted rows: mean ASR, mean PA, rows with the best PA at no larger CA cost than
    FIRE paired's, mean ms per image."""
    counted = [r for r in rows if r["learned"]]
    keys = list(dict.fromkeys((r["model"], r["variant"]) for r in counted))
    by = {(r["model"], r["variant"], r["defense"]): r for r in counted}
    best = dict.fromkeys(defenses, 0)
    for k in keys:
        fire_cost = by[(*k, "none")]["CA"] - by[(*k, "FIRE paired")]["CA"]
        eligible = [
            d for d in defenses if by[(*k, "none")]["CA"] - by[(*k, d)]["CA"] <= fire_cost + 1e-9 or d == "FIRE paired"
        ]
        top = max(by[(*k, d)]["PA"] for d in eligible)
        for d in eligible:
            best[d] += by[(*k, d)]["PA"] == top

    def mean(d: str, metric: str) -> float:
        return float(np.mean([by[(*k, d)][metric] for k in keys])) if keys else float("nan")

    return {d: (mean(d, "ASR"), mean(d, "PA"), best[d], mean(d, "ms_per_image")) for d in defenses}


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [summary[n][0] for n in names], 0.4, label="mean ASR %")
    ax.bar(xs + 0.2, [summary[n][1] for n in names], 0.4, label="mean PA %")
    ax.set_xticks(xs, names, rotation=25, ha="right", fontsize=8)
    ax.set_title("Trigger variants the models learned (counted rows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    print(run_adaptive().read_text())


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
