"""Helpers for Ray Data numpy batches (dict of column arrays) shared by the stages."""

from __future__ import annotations

import numpy as np


def objects(values: list) -> np.ndarray:
    """A 1-D object array: how a column of ragged per-row arrays (or strings) is returned."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def mark(batch: dict, i: int, status: str, reason: str, detail: str = "") -> None:
    """Set row i's status, reason and detail. String columns may arrive as fixed-width numpy
    unicode, which would truncate a longer value, so they become object arrays first."""
    for key, value in (("status", status), ("reason", reason), ("detail", detail)):
        if batch[key].dtype != object:
            batch[key] = batch[key].astype(object)
        batch[key][i] = value
