"""SAEs for the feature analyses: ``ctx.saes``, which also reads dictionary_learning checkpoints
(``runner/saes/dictionary_learning.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.saes.dictionary_learning import DICT_CLASSES, dictionary_learning_sae, is_dictionary_learning_dir

if TYPE_CHECKING:
    from runner.saes import SAESource
    from runner.saes.loading import LoadedSAE
    from runner.step import StepContext

__all__ = ["DICT_CLASSES", "dictionary_learning_sae", "is_dictionary_learning_dir", "load_feature_saes"]


def load_feature_saes(
    ctx: StepContext, source: SAESource, *, layers: tuple[int, ...] | None, site: str | None, where: str
) -> list[LoadedSAE]:
    """The SAEs of ``source`` (every format ``ctx.saes`` reads, dictionary_learning folders included)."""
    return ctx.saes(source, layers=layers, site=site, where=where)
