"""Sparse autoencoders: where an SAE comes from (:class:`SAESource`, a params type) and the SAEs runner ships.

An analysis that edits or reads SAE features declares ``needs=(..., "saes")`` and a param
``sae: SAESource``; a spec then writes one of

- ``sae: {name: smollm2-135m/blocks.12.hook_resid_post}``: an SAE shipped with runner (offline;
  ``runner/saes/shipped/``, listed by :func:`shipped_saes`).
- ``sae: {release: gpt2-small-res-jb}``: a SAELens pretrained release, downloaded from the Hugging
  Face hub (fails within seconds when the hub is unreachable and the SAE is not cached). ``id``
  picks the SAE inside the release and may be a per-layer template, e.g.
  ``id: "blocks.{layer}.hook_resid_pre"``; without it the SAE named after the hook is used.
- ``sae: {path: path/to/sae-dir}``: a local SAELens directory (``cfg.json`` +
  ``sae_weights.safetensors``), relative to the spec file; ``{layer}`` is replaced per layer.
- ``sae: {from_step: train}``: the SAEs trained by the cases of an earlier ``train_sae`` step.

Loading is the engine's (:mod:`runner.saes.loading`, through ``ctx.saes(...)``): each SAE is loaded
once per run. This module imports neither torch nor sae_lens, so that ``runner validate`` stays fast.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from runner.registry import did_you_mean
from runner.results import Array, JSONValue, StepResult

__all__ = [
    "SHIPPED_DIR",
    "SAESource",
    "TrainedSAE",
    "known_releases",
    "release_names",
    "shipped_sae_dir",
    "shipped_saes",
]

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
"""SAELens directories shipped as package data: ``shipped/<model>/<hook>/``."""


def _releases_file() -> Path | None:
    """SAELens' ``pretrained_saes.yaml``, found without importing sae_lens (which takes seconds)."""
    spec = importlib.util.find_spec("sae_lens")
    return None if spec is None or spec.origin is None else Path(spec.origin).parent / "pretrained_saes.yaml"


@functools.lru_cache(maxsize=1)
def release_names() -> frozenset[str]:
    """The names of SAELens' pretrained releases: the YAML file's top-level keys.

    Read by scanning for unindented keys (milliseconds): building the whole 2 MB document as
    Python objects takes seconds, and ``runner validate`` only needs the names.
    """
    path = _releases_file()
    if path is None:
        return frozenset()
    return frozenset(re.findall(r"^([^\s#][^:]*):", path.read_text(encoding="utf-8"), flags=re.MULTILINE))


@functools.lru_cache(maxsize=1)
def known_releases() -> dict[str, dict[str, Any]]:
    """SAELens' pretrained releases (name → entry: repo, SAE ids, ...), for loading one."""
    import yaml

    path = _releases_file()
    if path is None:
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return dict(yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {})


def shipped_saes() -> list[str]:
    """Names of the shipped SAEs, ``<model>/<hook>`` (e.g. ``smollm2-135m/blocks.12.hook_resid_post``)."""
    return sorted(p.parent.relative_to(SHIPPED_DIR).as_posix() for p in SHIPPED_DIR.glob("*/*/cfg.json"))


def shipped_sae_dir(name: str) -> Path:
    """The directory of the shipped SAE ``name``; ``ValueError`` listing the shipped ones otherwise."""
    names = shipped_saes()
    if name not in names:
        raise ValueError(
            f"runner ships no SAE named {name!r}.{did_you_mean(name, names)} "
            f"Shipped: {', '.join(names) or '(none)'}; for your own SAE use `path:`"
        )
    return SHIPPED_DIR / name


class SAESource(BaseModel):
    """Where an analysis gets its SAE(s): shipped, a SAELens release, a local directory, or an earlier step.

    Give exactly one of ``name``, ``release``, ``path`` or ``from_step``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str | None = None
    """An SAE shipped with runner, e.g. `smollm2-135m/blocks.12.hook_resid_post` (works offline);
    `{layer}` is replaced by each layer."""
    release: str | None = None
    """A SAELens pretrained release, e.g. `gpt2-small-res-jb` (downloaded from the Hugging Face hub)."""
    id: str | None = None
    """The SAE id inside `release`; `{layer}` is replaced by each layer, e.g. `blocks.{layer}.hook_resid_pre`.
    Default: the id named after the requested hook (or its resid_pre/resid_post twin)."""
    path: str | None = None
    """A local SAELens directory (cfg.json + sae_weights.safetensors), relative to the spec file;
    `{layer}` is replaced by each layer."""
    from_step: str | None = None
    """The id of an earlier `train_sae` step of this spec: the SAEs its cases trained."""

    @model_validator(mode="after")
    def _check_one_source(self) -> SAESource:
        given = [n for n in ("name", "release", "path", "from_step") if getattr(self, n) is not None]
        if len(given) != 1:
            got = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(
                "give exactly one of `name` (shipped with runner), `release` (SAELens pretrained), "
                f"`path` (local SAELens directory) or `from_step` (an earlier train_sae step); {got}"
            )
        if self.id is not None and self.release is None:
            raise ValueError("`id` selects an SAE inside a `release`; it goes with no other source")
        if self.name is not None and "{layer}" not in self.name:
            shipped_sae_dir(self.name)
        if self.release is not None:
            releases = release_names()
            if releases and self.release not in releases:
                raise ValueError(
                    f"unknown SAELens release {self.release!r}.{did_you_mean(self.release, list(releases))} "
                    f"SAELens lists {len(releases)} releases in sae_lens/pretrained_saes.yaml; "
                    "for your own SAE use `path:`"
                )
        return self

    def describe(self) -> str:
        """``shipped x``, ``release gpt2-small-res-jb``, ``path saes/x`` or ``step train``, for reports."""
        if self.name is not None:
            return f"shipped {self.name}"
        if self.release is not None:
            return f"release {self.release}" + (f" (id {self.id})" if self.id else "")
        return f"path {self.path}" if self.path is not None else f"step {self.from_step}"


class TrainedSAE(StepResult):
    """A result that carries an SAE: what ``sae: {from_step: ...}`` reads (``train_sae`` makes one).

    An analysis whose result subclasses this can feed SAE analyses later in the spec.
    """

    sae_hook: str
    """The hook the SAE reads (``blocks.12.hook_resid_post``)."""
    sae_cfg: JSONValue
    """The SAE's SAELens config (the ``cfg.json`` of its directory)."""
    sae_weights: dict[str, Array]
    """The SAE's parameters by SAELens name (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ...)."""
