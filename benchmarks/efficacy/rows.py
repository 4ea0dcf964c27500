"""One CSV row per (model, defense): the schema, and lookups over rows."""

from __future__ import annotations

CSV_FIELDS = (
    "dataset",
    "model",
    "arch",
    "attack",
    "group",
    "defense",
    "layer",
    "mode",
    "alpha",
    "rank",
    "estimator",
    "n_poisoned",
    "CA",
    "ASR",
    "PA",
)


def row(ident: dict, group: str, defense: str, metrics: dict, **setting) -> dict:
    """One CSV row; settings a defense does not have stay empty."""
    empty = {"layer": "", "mode": "", "alpha": "", "rank": "", "estimator": "", "n_poisoned": ""}
    return {**ident, "group": group, "defense": defense, **empty, **setting, **metrics}


def headline(rows: list[dict], model: str) -> dict[str, dict]:
    """A model's headline rows by defense name."""
    return {r["defense"]: r for r in rows if r["model"] == model and r["group"] == "headline"}
