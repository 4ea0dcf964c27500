"""Trigger variants (``benchmarks.variants``) and the adaptive-attacker benchmark on a real zoo model."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from benchmarks.adaptive import AdaptiveConfig, kept_rows, run_adaptive, settings, twin_of, versus, write
from benchmarks.variants import variants
from calibration.cutsearch import ALPHAS
from fire_backend.errors import InvalidInputError, MissingFileError
from fire_backend.names import PROJECT_ROOT
from zoo.attacks import make_attack


def test_variants_move_resize_and_dim_the_trigger_not_the_image():
    attack = make_attack("badnets")
    x = np.full((2, 32, 32, 3), 100, np.uint8)
    v = variants(attack)
    changed = {name: (f(x) != x).any(-1)[0] for name, f in v.items()}
    assert changed["calibrated"][29:, 29:].all() and changed["calibrated"].sum() == 9  # 3x3, bottom-right
    assert changed["mirrored left-right"][29:, :3].all() and changed["mirrored left-right"].sum() == 9
    assert changed["mirrored both"][:3, :3].all()
    assert changed["shifted 4 px"][25:28, 25:28].all() and changed["shifted 4 px"].sum() == 9
    assert changed["scaled 2.5x"].sum() > 2 * changed["calibrated"].sum()
    dim = v["dimmed 60 %"](x)[0, 31, 31]
    assert dim.min() > 100 and dim.max() < attack.apply(x)[0, 31, 31].max()


def test_the_adaptive_benchmark_writes_every_defense_and_spatial_views_beat_rank_1(tmp_path):
    cfg = AdaptiveConfig(models=("cifar10_resnet_badnets",), test_limit=200, baseline_limit=40, n_clean=160,
                         every_cut=True, out_dir=tmp_path)  # fmt: skip
    report = run_adaptive(cfg).read_text()
    with open(tmp_path / "adaptive.csv") as f:
        rows = list(csv.DictReader(f))
    defenses = {r["defense"] for r in rows}
    assert {"none", "FIRE paired", "FIRE unpaired", "STRIP", "SCALE-UP", "FIRE paired, cut chosen"} <= defenses
    assert len(defenses) == 9
    by = {(r["variant"], r["defense"]): r for r in rows}
    mirrored = "mirrored left-right"
    assert by[(mirrored, "none")]["learned"] == "True"
    assert float(by[(mirrored, "FIRE paired")]["ASR"]) < 10 < 50 < float(by[(mirrored, "FIRE rank 1, paired")]["ASR"])
    assert "Targets (FIRE paired" in report and (tmp_path / "adaptive.png").is_file()
    ceilings = {float(r["ceiling"]) for r in rows if r["defense"] == "none" and r["variant"] == "calibrated"}
    (ceiling,) = ceilings  # the clean twin's PA on the calibrated trigger: a patch leaves most images legible
    assert float(by[("calibrated", "none")]["PA"]) < 20 < 60 < ceiling <= 100
    chosen = {(r["cut"], r["strength"]) for r in rows if r["defense"] == "FIRE paired, cut chosen"}
    assert len(chosen) == 1 and "cut chosen" in report
    ((cut, strength),) = chosen
    assert cut and float(strength) in ALPHAS and f"{cut} x{float(strength):g}" in report
    # --every-cut: the search's every candidate on the same test images; its chosen line and its layer2 x1
    # line are the same repairs as the chosen and the FIRE paired columns, so they give the same numbers
    with open(tmp_path / "adaptive_cuts.csv") as f:
        cut_rows = list(csv.DictReader(f))
    counted = {r["variant"] for r in rows if r["defense"] == "none" and r["learned"] == "True"}
    lines = {(r["cut"], float(r["strength"])) for r in cut_rows}
    assert ("layer2", 1.0) in lines and len(lines) % len(ALPHAS) == 0 and len(cut_rows) == len(lines) * len(counted)
    for (c, a), defense in (((cut, float(strength)), "FIRE paired, cut chosen"), (("layer2", 1.0), "FIRE paired")):
        got = {r["variant"]: r for r in cut_rows if (r["cut"], float(r["strength"])) == (c, a)}
        assert set(got) == counted
        assert defense == "FIRE paired" or all(r["chosen"] == "True" for r in got.values())
        assert {r["views"] for r in got.values()} == {by[(v, defense)]["views"] for v in got}  # the same estimate
        diff = {
            v: (r["ASR"], r["PA"], by[(v, defense)]["ASR"], by[(v, defense)]["PA"])
            for v, r in got.items()
            if (float(r["ASR"]), float(r["PA"])) != (float(by[(v, defense)]["ASR"]), float(by[(v, defense)]["PA"]))
        }
        assert not diff, (c, a, defense, diff)
    assert "**" in (tmp_path / "adaptive_cuts.md").read_text()
    assert "FIRE against each baseline" in report and "FIRE paired, cut chosen vs STRIP: ahead on " in report


def test_fire_against_a_baseline_is_ahead_only_where_neither_its_pa_nor_its_ca_is_lower():
    def row(variant, defense, ca, pa, learned=True):
        return {"model": "m", "variant": variant, "defense": defense, "CA": ca, "PA": pa, "learned": learned}

    rows = [row(v, "none", 80.0, 5.0, learned=v != "unlearned") for v in ("a", "b", "c", "d", "unlearned")]
    rows += [row("a", "FIRE", 79.0, 70.0), row("a", "B", 78.0, 60.0)]  # ahead on both
    rows += [row("b", "FIRE", 79.0, 70.0), row("b", "B", 79.5, 10.0)]  # more PA, more CA
    rows += [row("c", "FIRE", 79.0, 20.0), row("c", "B", 75.0, 30.0)]  # less PA, less CA: a trade
    rows += [row("d", "FIRE", 79.0, 20.0), row("d", "B", 79.0, 30.0)]  # less PA, same CA: behind
    rows += [row("unlearned", "FIRE", 10.0, 0.0), row("unlearned", "B", 80.0, 90.0)]  # not counted
    (line,) = versus(rows, "FIRE", ["B"])
    assert line.startswith("FIRE vs B: ahead on 1 of 4; more PA for more CA on 1 (m: 1 rows, PA +60.0 for 0.50 ")
    assert "a trade on m / c (PA 20.0 vs 30.0" in line and "behind on m / d (PA 20.0 vs 30.0" in line
    assert "unlearned" not in line


def test_every_dataset_has_a_clean_twin_and_keep_others_rejoins_an_earlier_run(tmp_path):
    assert twin_of("gtsrb", "resnet_small") == "gtsrb_resnet_clean"
    assert twin_of("cifar10", "vgg_small") == "cifar10_resnet_clean"  # no clean VGG: the dataset's twin
    assert twin_of("no-such-dataset", "resnet_small") is None
    earlier, cfg = tmp_path / "earlier", AdaptiveConfig(out_dir=tmp_path / "merged")
    earlier.mkdir()
    for name in ("adaptive.csv", "adaptive.json"):  # a real run's rows stand in for the one before
        shutil.copy(PROJECT_ROOT / "results" / name, earlier / name)
    every = kept_rows(earlier, [], [], settings(cfg))
    models = list(dict.fromkeys(r["model"] for r in every))
    assert models == sorted(models) and len(models) > 2
    measured = [models[1], "a_model_new_to_the_table"]  # one re-measured, one the earlier run did not have
    new = [{**r, "ASR": 0.0} for r in every if r["model"] == models[1]]
    new += [{**r, "model": measured[1]} for r in every if r["model"] == models[1]]
    merged = kept_rows(earlier, measured, new, settings(cfg))
    assert list(dict.fromkeys(r["model"] for r in merged)) == sorted([*models, measured[1]])
    assert len(merged) == len(every) + len(new) // 2 and {r["ASR"] for r in merged if r["model"] == models[1]} == {0.0}
    one = next(r for r in merged if r["model"] == models[0] and r["defense"] == "FIRE paired, cut chosen")
    assert isinstance(one["CA"], float) and isinstance(one["learned"], bool) and isinstance(one["images"], int)
    assert isinstance(one["all_to_one"], bool) and "TPR" not in one  # a blank cell is no value, as in a fresh row
    report = write(merged, cfg, 1.0, measured).read_text()
    assert f"measuring {', '.join(measured)}; the other models' rows kept from the adaptive.csv there" in report
    assert f"{len(models) + 1} models" in report
    same = lambda rows: [str(sorted(r.items())) for r in rows]  # noqa: E731 - NaN (a TPR without attacks) as text
    assert same(kept_rows(cfg.out_dir, [], [], settings(cfg))) == same(merged)  # write() then read: the same rows
    with pytest.raises(InvalidInputError, match="measured with"):  # rows of other settings are not kept
        kept_rows(earlier, [], [], settings(AdaptiveConfig(test_limit=600)))
    (earlier / "adaptive.csv").write_text("model,variant\n")
    with pytest.raises(InvalidInputError, match="columns"):
        kept_rows(earlier, [], [], settings(cfg))
    (earlier / "adaptive.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        kept_rows(earlier, [], [], settings(cfg))
    (earlier / "adaptive.json").unlink()
    with pytest.raises(MissingFileError, match="no earlier run"):
        kept_rows(earlier, [], [], settings(cfg))
    with pytest.raises(InvalidInputError, match="every-cut"):
        run_adaptive(AdaptiveConfig(keep_others=True, every_cut=True, out_dir=earlier))
    with pytest.raises(MissingFileError):  # refused before anything is measured
        run_adaptive(AdaptiveConfig(keep_others=True, out_dir=earlier))
    # the all-to-one targets on the calibrated trigger: a row 0.01 past floor + 1 is missed, one at it met;
    # an all-to-all attack is not judged by them
    calibrated = [r for r in merged if r["variant"] == "calibrated" and r["defense"] == "FIRE paired" and r["learned"]]
    floor = lambda r: r["floor"] if r["floor"] != "" else 0.0  # noqa: E731
    none_ca = {r["model"]: r["CA"] for r in merged if r["defense"] == "none"}
    for r in calibrated:
        r["CA"] = none_ca[r["model"]]  # no CA cost: the row is judged on ASR and PA alone
        r["ASR"], r["PA"] = floor(r) + 1.0, r["CA"] - 2.0
    calibrated[0]["ASR"] += 0.01
    all_to_all = calibrated[-1]["model"]
    for r in merged:
        r["all_to_one"] = r["model"] != all_to_all
    line = next(x for x in write(merged, cfg, 1.0, measured).read_text().splitlines() if x.startswith("All-to-one"))
    n = len(calibrated) - 1
    assert f"FIRE paired **{n - 1} of {n} met**; missed: {calibrated[0]['model']} / calibrated" in line, line
