"""Run-scoped resources: models, datasets and SAEs loaded once and shared by every case that needs them.

Like pytest fixtures with a session scope, keyed by the settings that define them. Only one model
is kept in memory at a time: a spec that sweeps models runs each model's cases together. An
analysis declares the kinds it uses in ``needs`` (see :data:`runner.registry.RESOURCES`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.datasets import TokenDataset, cached_tokenize, fingerprint_tokens, load_text
from runner.models.loaded import LoadedModel, resolve_device
from runner.models.loaders import load_model
from runner.models.weight_cache import default_cache_dir
from runner.spec import DatasetSpec, ModelSpec

if TYPE_CHECKING:
    from runner.saes import SAESource
    from runner.saes.loading import LoadedSAE
    from runner.step import StepContext

__all__ = ["Resources"]


class Resources:
    """Loads and caches the resources of a run; records what was loaded for the manifest."""

    def __init__(
        self,
        *,
        base_dir: Path,
        device_override: str | None = None,
        status: Callable[[str], AbstractContextManager[Any]] | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.device_override = device_override
        self.cache_dir = cache_dir or default_cache_dir()
        """Where converted model weights and tokenized datasets are kept (not the result cache)."""
        self._status = status or (lambda message: nullcontext())
        self._model_key: tuple[str, str, str] | None = None
        self._model: LoadedModel | None = None
        self._datasets: dict[tuple[Any, ...], TokenDataset] = {}
        self.loaded: dict[str, dict[str, Any]] = {"models": {}, "datasets": {}, "saes": {}}

    def device(self, spec: ModelSpec) -> str:
        """The concrete device for ``spec`` (``--device`` wins over the spec)."""
        return resolve_device(self.device_override or spec.device)

    def model(self, spec: ModelSpec) -> LoadedModel:
        """The model for ``spec``, loading it (and releasing the previous one) on first use."""
        key = (spec.name, self.device(spec), spec.dtype)
        if key != self._model_key:
            self._model = None  # release before loading the next one
            with self._status(f"Loading model {spec.name} on {key[1]} ({spec.dtype})"):
                self._model = load_model(spec.name, device=key[1], dtype=spec.dtype, cache_dir=self.cache_dir)
            self._model_key = key
            self.loaded["models"][spec.name] = {"source": self._model.source, **self._model.info}
        assert self._model is not None
        return self._model

    def dataset(self, spec: DatasetSpec, model_spec: ModelSpec) -> TokenDataset:
        """``spec`` tokenized with ``model_spec``'s tokenizer (cached per pair)."""
        key = (spec, model_spec.name)
        if key not in self._datasets:
            tokenizer = self.model(model_spec).tokenizer
            with self._status(f"Tokenizing dataset {spec.name}"):
                text = load_text(
                    spec.name, split=spec.split, text_field=spec.text_field, base_dir=self.base_dir
                )
                tokens, tokenized = cached_tokenize(
                    text,
                    tokenizer,
                    max_passages=spec.max_passages,
                    max_len=spec.max_len,
                    prepend_bos=spec.prepend_bos,
                    cache_dir=self.cache_dir,
                )
            info = {
                "spec": spec.model_dump(),
                "tokenizer_of": model_spec.name,
                "n_passages": int(tokens.shape[0]),
                "max_len": int(tokens.shape[1]),
                "n_characters": len(text),
                "tokens": tokenized,
            }
            dataset = TokenDataset(spec.name, tokens, fingerprint_tokens(tokens), info)
            if dataset.tokens.shape[0] < spec.max_passages:
                dataset.info["note"] = (
                    f"the text holds only {tokens.shape[0]} passages of {spec.max_len} tokens; "
                    f"max_passages asked for {spec.max_passages}"
                )
            self._datasets[key] = dataset
            label = f"{spec.name} ({model_spec.name} tokenizer, {spec.max_passages}x{spec.max_len})"
            self.loaded["datasets"][label] = {"fingerprint": dataset.fingerprint, **info}
        return self._datasets[key]

    def load_saes(
        self,
        ctx: StepContext,
        source: SAESource,
        *,
        layers: tuple[int, ...] | None,
        site: str | None,
        where: str,
    ) -> list[LoadedSAE]:
        """The SAEs a case asks for (each loaded once per run); records where each came from."""
        from runner.saes.loading import load_saes

        saes = load_saes(ctx, source, layers=layers, site=site, where=where)
        for sae in saes:
            self.loaded["saes"].setdefault(sae.source, sae.info)
        return saes
