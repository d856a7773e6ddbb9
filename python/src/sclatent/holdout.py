"""Held-out attribute combinations: the protocol of "generate what was never seen in training".

`prepare --holdout 'cell_type=X,condition=Y;...'` sends every cell of each listed combination to the test split
(never to training). A combination names some or all of the condition keys; a cell belongs to it when it holds
every named value. These helpers are the one place of that rule: the spec parser, the mask, and the names of the
attribute combinations a split contains (which EVALUATE reads to tell seen from never-seen combinations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import InputError
from .io import joint_labels


def parse_holdout(text: str | None) -> list[dict[str, str]]:
    """'cell_type=X,condition=Y;cell_type=Z' -> [{'cell_type': 'X', 'condition': 'Y'}, {'cell_type': 'Z'}]."""
    combos: list[dict[str, str]] = []
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        combo: dict[str, str] = {}
        for item in part.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise InputError(f"--holdout '{part.strip()}': expected key=value[,key=value...] (';' between them)")
            if key in combo:
                raise InputError(f"--holdout '{part.strip()}': key '{key}' given twice")
            combo[key] = value
        if combo in combos:
            raise InputError(f"--holdout: the combination '{part.strip()}' is listed twice")
        combos.append(combo)
    return combos


def holdout_mask(obs: pd.DataFrame, combos: Sequence[Mapping[str, str]], keys: Sequence[str]) -> np.ndarray:
    """Boolean mask (n,) of the cells of any held-out combination.

    Every key must be a condition key (`keys`) and every value must occur in obs, else a one-line InputError.
    """
    held = np.zeros(len(obs), dtype=bool)
    for combo in combos:
        mask = np.ones(len(obs), dtype=bool)
        for key, value in combo.items():
            if key not in keys:
                raise InputError(
                    f"--holdout {key}={value}: '{key}' is not a condition key ({', '.join(keys) or 'none given'})"
                )
            column = obs[key].astype(str).to_numpy()
            if not (column == value).any():
                known = ", ".join(sorted(set(column.tolist()))[:20])
                raise InputError(f"--holdout {key}={value}: no cell has {key}={value} (values of '{key}': {known})")
            mask &= column == value
        if not mask.any():
            raise InputError(f"--holdout {combo_name(combo)}: no cell has this combination of values")
        held |= mask
    return held


def combo_name(combo: Mapping[str, str]) -> str:
    """'cell_type=X,condition=Y' for {'cell_type': 'X', 'condition': 'Y'}."""
    return ",".join(f"{k}={v}" for k, v in combo.items())


def joint_classes(obs: pd.DataFrame, keys: Sequence[str]) -> np.ndarray:
    """Each cell's joint class name (n,): its values of `keys` joined by '|' (the metrics' per-class names)."""
    if not keys:
        return np.full(len(obs), "", dtype=object)
    return joint_labels(obs, list(keys))


def combinations_of(obs: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The sorted joint class names present in obs (the combinations a split contains)."""
    return sorted(set(joint_classes(obs, keys).tolist())) if len(keys) >= 2 else []
