"""Trigger variants an attacker who knows the backdoor will try, for any zoo attack: each is a function
of the attack's own ``apply`` (so it works for patches, blends, SIG and WaNet alike) and of the image.

- mirrored left-right / top-bottom / both: ``flip(apply(flip(x)))``: the trigger mirrored, the image not
  (a corner patch moves to the other corners);
- shifted: the trigger moved 4 px up and left (image content unchanged);
- scaled 1.5x / 2.5x: a stamped trigger's pattern and mask zoomed about their centre (not for WaNet, SIG);
- dimmed: 60 % of the trigger's change; noise-blended: the triggered image blended with 10 % noise.

A variant counts as learned by a model when the undefended ASR on it is >= 50 % (``LEARNED``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from zoo.attacks import Attack, Trigger

LEARNED = 50.0  # undefended ASR (%) from which a variant counts


def _scaled(attack: Attack, factor: float) -> Callable[[np.ndarray], np.ndarray] | None:
    """The trigger's pattern and mask zoomed by ``factor`` about the mask's centre (what leaves the image
    is cut off), stamped the attack's way; None for an attack that is not a stamped trigger (WaNet, SIG)."""
    try:
        attack.trigger((32, 32))
    except NotImplementedError:
        return None
    except Exception:  # noqa: BLE001 - a trigger that needs another size still stamps
        pass

    def apply(x: np.ndarray) -> np.ndarray:
        t = attack.trigger(tuple(x.shape[1:3]))
        h, w = t.mask.shape[:2]
        weight = t.mask[..., 0]
        cy, cx = (np.indices((h, w)) * weight).reshape(2, -1).sum(1) / weight.sum()
        rows = np.clip(np.rint(cy + (np.arange(h) - cy) / factor), 0, h - 1).astype(int)
        cols = np.clip(np.rint(cx + (np.arange(w) - cx) / factor), 0, w - 1).astype(int)
        return Trigger(t.pattern[rows][:, cols], t.mask[rows][:, cols]).stamp(x)

    return apply


def variants(attack: Attack, seed: int = 7) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    noise_rng = np.random.default_rng(seed)

    def flipped(axes: tuple[int, ...]):
        return lambda x: np.flip(attack.apply(np.ascontiguousarray(np.flip(x, axes))), axes).copy()

    def shifted(x: np.ndarray) -> np.ndarray:
        return np.roll(attack.apply(np.roll(x, (4, 4), (1, 2))), (-4, -4), (1, 2))

    def dimmed(x: np.ndarray) -> np.ndarray:
        t = attack.apply(x).astype(np.float32)
        return np.clip(np.rint(x + 0.6 * (t - x)), 0, 255).astype(np.uint8)

    def noise_blended(x: np.ndarray) -> np.ndarray:
        noise = noise_rng.integers(0, 256, size=x.shape[1:]).astype(np.float32)
        return np.clip(np.rint(0.9 * attack.apply(x) + 0.1 * noise), 0, 255).astype(np.uint8)

    out = {
        "calibrated": attack.apply,
        "mirrored left-right": flipped((2,)),
        "mirrored top-bottom": flipped((1,)),
        "mirrored both": flipped((1, 2)),
        "shifted 4 px": shifted,
        "scaled 1.5x": _scaled(attack, 1.5),
        "scaled 2.5x": _scaled(attack, 2.5),
        "dimmed 60 %": dimmed,
        "noise-blended 10 %": noise_blended,
    }
    return {name: f for name, f in out.items() if f is not None}
