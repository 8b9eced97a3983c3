"""The features CSV of the SAE analyses (``features_csv``): ``layer,feature,label``, one row per feature."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import ResourceError

if TYPE_CHECKING:
    from runner.step import StepContext

__all__ = ["read_features_csv"]


def read_features_csv(ctx: StepContext, csv: str | None, where: str) -> dict[int, dict[int, str]]:
    """Layer → feature → label, in the file's row order (a path relative to the spec); ``{}`` without one.

    The ``label`` column is optional (labels are then ``""``); every problem is a located
    :class:`ResourceError` that says what the file should hold.
    """
    if csv is None:
        return {}
    import pandas as pd

    path = Path(csv) if Path(csv).is_absolute() else ctx.spec_dir / csv
    if not path.is_file():
        raise ResourceError(
            f"{where}: the features CSV {path} does not exist (`features_csv: {csv}`, from the spec).\n"
            "Write it with a header `layer,feature,label` and one row per feature, e.g. from Neuronpedia "
            "(https://www.neuronpedia.org/gpt2-small/res-jb)."
        )
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ResourceError(
            f"{where}: cannot read the features CSV {path} (`features_csv: {csv}`): {exc}\n"
            "Write it with the header `layer,feature,label` and one row per feature."
        ) from None
    missing = [c for c in ("layer", "feature") if c not in table.columns]
    if missing:
        raise ResourceError(
            f"{where}: {path} has no column {' or '.join(missing)} "
            f"(columns: {', '.join(map(str, table.columns))}).\n"
            "Use the header `layer,feature,label`."
        )
    out: dict[int, dict[int, str]] = {}
    labels = table["label"] if "label" in table.columns else [""] * len(table)
    for layer, feature, label in zip(table["layer"], table["feature"], labels, strict=True):
        blank = isinstance(label, float) and math.isnan(label)
        out.setdefault(int(layer), {})[int(feature)] = "" if blank else str(label)
    return out
