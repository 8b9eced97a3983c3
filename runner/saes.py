"""Sparse autoencoders as run-scoped resources: where an SAE comes from, which hook it reads.

An analysis declares ``sae: SAESource`` among its params; a spec then writes one of

- ``sae: {release: gpt2-small-res-jb}``: a SAELens pretrained release, downloaded from the Hugging
  Face hub (fails within seconds when the hub is unreachable and the SAE is not cached). ``id``
  picks the SAE inside the release and may be a per-layer template, e.g.
  ``id: "blocks.{layer}.hook_resid_pre"``; without it the SAE named after the hook is used.
- ``sae: {path: ../saes/smollm2-135m/blocks.{layer}.hook_resid_post}``: a local SAELens directory
  (``cfg.json`` + ``sae_weights.safetensors``), relative to the spec file.
- ``sae: {from_step: train}``: the SAEs trained by the cases of an earlier ``train_sae`` step.

:func:`load_saes` resolves a request (layers and a hook site) into one :class:`LoadedSAE` per
layer, loading each SAE once per run through ``StepContext.cached``. The hook always comes from the
SAE's own metadata (``cfg.metadata.hook_name``). A request for another hook is an error, except for
the one identity TransformerLens guarantees: ``blocks.{L}.hook_resid_post`` is the same tensor as
``blocks.{L+1}.hook_resid_pre``. So "resid_post of layer 5" is served by an SAE trained on
``blocks.6.hook_resid_pre`` (``gpt2-small-res-jb`` has only resid_pre SAEs, plus resid_post of
layer 11), and the case says so in a note.

sae_lens is imported inside the functions that need it: importing it takes seconds, and
``runner validate`` only needs :func:`known_releases` (read from SAELens' own YAML file).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from runner.errors import ResourceError

if TYPE_CHECKING:
    from sae_lens import SAE

    from runner.step import StepContext

__all__ = [
    "SAE_SITES",
    "LoadedSAE",
    "SAESource",
    "equivalent_hooks",
    "known_releases",
    "load_saes",
    "parse_hook",
    "sae_hook_name",
]

SAE_SITES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_post": "mlp.hook_post",
}
"""Sites an SAE may read, as in ``activation_importance``: ``blocks.{layer}.<hook>``."""

_HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(h) for h in SAE_SITES.values()) + r")$")
_SITE_OF_HOOK = {hook: site for site, hook in SAE_SITES.items()}
SAE_WEIGHTS_FILE = "sae_weights.safetensors"
SAE_CFG_FILE = "cfg.json"
OFFLINE_ALTERNATIVES = (
    "Use an SAE that loads offline instead:\n"
    "  sae: {path: ../saes/smollm2-135m/blocks.12.hook_resid_post}  # shipped with runner, for smollm2-135m\n"
    "  sae: {path: path/to/sae-dir}           # any SAELens directory (cfg.json + sae_weights.safetensors)\n"
    "  sae: {from_step: train}                # trained by an earlier `train_sae` step of the spec"
)


# ----------------------------------------------------------------------------------------------
# Hook names


def sae_hook_name(site: str, layer: int) -> str:
    """``sae_hook_name("resid_post", 6)`` → ``"blocks.6.hook_resid_post"``."""
    return f"blocks.{layer}.{SAE_SITES[site]}"


def parse_hook(hook: str) -> tuple[int, str] | None:
    """``"blocks.6.hook_resid_post"`` → ``(6, "resid_post")``; None for hooks outside the blocks' sites."""
    match = _HOOK_PATTERN.match(hook)
    return (int(match.group(1)), _SITE_OF_HOOK[match.group(2)]) if match else None


def equivalent_hooks(hook: str, n_layers: int | None = None) -> list[str]:
    """``hook`` and the hooks that TransformerLens guarantees hold the same tensor.

    ``blocks.{L}.hook_resid_post`` is ``blocks.{L+1}.hook_resid_pre`` (when layer L+1 exists).
    """
    parsed = parse_hook(hook)
    if parsed is None:
        return [hook]
    layer, site = parsed
    if site == "resid_post" and (n_layers is None or layer + 1 < n_layers):
        return [hook, sae_hook_name("resid_pre", layer + 1)]
    if site == "resid_pre" and layer > 0:
        return [hook, sae_hook_name("resid_post", layer - 1)]
    return [hook]


# ----------------------------------------------------------------------------------------------
# The params type


@functools.lru_cache(maxsize=1)
def known_releases() -> dict[str, dict[str, Any]]:
    """SAELens' pretrained releases (name → entry), read from its YAML file without importing sae_lens."""
    import yaml

    spec = importlib.util.find_spec("sae_lens")
    if spec is None or spec.origin is None:
        return {}
    path = Path(spec.origin).parent / "pretrained_saes.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return dict(yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {})


class SAESource(BaseModel):
    """Where an analysis gets its SAE(s): a SAELens release, a local directory, or an earlier step.

    Give exactly one of ``release``, ``path`` or ``from_step``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

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
        given = [name for name in ("release", "path", "from_step") if getattr(self, name) is not None]
        if len(given) != 1:
            got = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(
                "give exactly one of `release` (SAELens pretrained), `path` (local SAELens directory) "
                f"or `from_step` (an earlier train_sae step); {got}"
            )
        if self.id is not None and self.release is None:
            raise ValueError(
                "`id` selects an SAE inside a `release`; it goes with neither `path` nor `from_step`"
            )
        if self.release is not None:
            releases = known_releases()
            if releases and self.release not in releases:
                close = difflib.get_close_matches(self.release, list(releases), n=3, cutoff=0.6)
                hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(
                    f"unknown SAELens release {self.release!r}.{hint} SAELens lists {len(releases)} releases "
                    "in sae_lens/pretrained_saes.yaml; for your own SAE use `path:`"
                )
        return self

    def describe(self) -> str:
        """``release gpt2-small-res-jb``, ``path saes/x`` or ``step train``, as the report shows it."""
        if self.release is not None:
            return f"release {self.release}" + (f" (id {self.id})" if self.id else "")
        return f"path {self.path}" if self.path is not None else f"step {self.from_step}"


# ----------------------------------------------------------------------------------------------
# Loaded SAEs


@dataclass
class LoadedSAE:
    """An SAE ready for one layer of a case: the SAELens module plus where it reads and writes."""

    sae: SAE[Any]
    """The SAELens SAE, in eval mode, on the model's device and dtype."""
    layer: int
    """The layer as the analysis asked for it (``resid_post`` of this layer, say)."""
    site: str
    """The site as the analysis asked for it (``resid_post``, ``resid_pre``, ...)."""
    hook_name: str
    """The model hook the analysis reads and edits: ``blocks.{layer}.<site>``."""
    sae_hook: str
    """The hook the SAE was trained on (its metadata); equal to ``hook_name`` or its twin."""
    source: str
    """Human-readable origin, e.g. ``SAELens release gpt2-small-res-jb, id blocks.6.hook_resid_pre``."""
    info: dict[str, Any] = field(default_factory=dict)
    """JSON-able facts for the summary and manifest (architecture, d_sae, source, hook, ...)."""
    center_input: bool = False
    """Subtract each activation's mean over d_model before encoding: the SAE was trained on a model
    loaded with ``center_writing_weights`` (SAELens ``model_from_pretrained_kwargs``), whose residual
    stream is the raw one minus that mean. LayerNorm removes the mean, so the model's output is the same."""

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return int(self.sae.cfg.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(..., d_sae)`` of activations ``x`` ``(..., d_in)`` read at ``hook_name``."""
        if self.center_input:
            x = x - x.mean(dim=-1, keepdim=True)
        return self.sae.encode(x.to(self.sae.dtype))

    def decoder_scale(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., 1)``: how a change of feature activations maps to the input space at ``x``.

        ``decode(f') - decode(f) = ((f' - f) @ W_dec) * scale`` where the SAE normalizes its input
        at run time (``layer_norm``: the input's std; ``constant_norm_rescale``: ``|x| / sqrt(d_in)``),
        else 1.
        """
        norm = self.sae.cfg.normalize_activations
        if self.center_input:
            x = x - x.mean(dim=-1, keepdim=True)
        if norm == "layer_norm":
            return (x - x.mean(dim=-1, keepdim=True)).std(dim=-1, keepdim=True)
        if norm == "constant_norm_rescale":
            return x.norm(dim=-1, keepdim=True) / (self.sae.cfg.d_in**0.5)
        return torch.ones_like(x[..., :1])


def load_saes(
    ctx: StepContext, source: SAESource, *, layers: tuple[int, ...] | None, site: str | None, where: str
) -> list[LoadedSAE]:
    """One :class:`LoadedSAE` per requested layer, each SAE loaded once per run.

    ``layers=None`` takes every layer the source has; ``site=None`` takes the SAE's own hook.
    ``where`` names the requester in error messages (``sae_interventions case x[...]``).
    Raises :class:`ResourceError` with what to do next for every foreseeable problem.
    """
    if source.release is not None:
        saes = _from_release(ctx, source, layers, site, where)
    elif source.path is not None:
        saes = _from_path(ctx, source.path, layers, site, where)
    else:
        assert source.from_step is not None  # the validator guarantees one source
        saes = _from_step(ctx, source.from_step, layers, site, where)
    for loaded in saes:
        _check_fits_model(ctx, loaded, where)
        if loaded.sae_hook != loaded.hook_name:
            ctx.note(
                f"{loaded.hook_name} is served by the SAE trained on {loaded.sae_hook}: TransformerLens "
                f"passes blocks.{loaded.layer}'s output unchanged to the next block, so both hooks hold "
                "the same tensor."
            )
    return saes


def _requested_for(sae_hook: str, layer: int | None, site: str | None) -> str:
    """The hook a request names, given the SAE's own hook: its own or its twin when they fit the request.

    A request that fits neither yields the hook it names, which :func:`_check_same_tensor` reports.
    """
    for hook in equivalent_hooks(sae_hook):
        parsed = parse_hook(hook)
        if parsed and (layer is None or parsed[0] == layer) and (site is None or parsed[1] == site):
            return hook
    own = parse_hook(sae_hook)
    assert own is not None  # _sae_hook_of checked it
    return sae_hook_name(site or own[1], own[0] if layer is None else layer)


def _match(
    available: list[str], layers: tuple[int, ...] | None, site: str | None, n_layers: int
) -> list[tuple[str, str]]:
    """(requested hook, available hook) pairs for a request; a requested hook with no SAE pairs with ``""``.

    ``available`` are SAE hooks (a release's ids or a step's SAEs). Without ``layers`` every available
    SAE that fits ``site`` is used.
    """
    hooks = sorted((h for h in available if parse_hook(h)), key=lambda h: parse_hook(h) or (0, ""))
    if layers is None:
        pairs = {}
        for hook in hooks:
            requested = _requested_for(hook, None, site)
            if requested in equivalent_hooks(hook, n_layers) and requested not in pairs:
                pairs[requested] = hook
        return list(pairs.items())
    out = []
    for layer in layers:
        fits = [h for h in hooks if _requested_for(h, layer, site) in equivalent_hooks(h, n_layers)]
        own_layer = [h for h in fits if (parse_hook(h) or (-1, ""))[0] == layer]
        chosen = (own_layer or fits or [""])[0]
        requested = (
            _requested_for(chosen, layer, site) if chosen else sae_hook_name(site or "resid_pre", layer)
        )
        out.append((requested, chosen))
    return out


def _loaded(
    sae: SAE[Any], layer: int | None, site: str | None, source: str, info: dict[str, Any], where: str
) -> LoadedSAE:
    """Wrap a loaded SAE for the requested ``layer`` and ``site``; its hook must be that one or its twin."""
    sae_hook = _sae_hook_of(sae, source, where)
    requested = _requested_for(sae_hook, layer, site)
    parsed = parse_hook(requested)
    assert parsed is not None
    kwargs = sae.cfg.metadata.model_from_pretrained_kwargs or {}
    facts = {
        "source": source,
        "hook": requested,
        "sae_hook": sae_hook,
        "architecture": sae.cfg.architecture(),
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "trained_on_model": sae.cfg.metadata.model_name,
        **info,
    }
    center = bool(kwargs.get("center_writing_weights"))
    loaded = LoadedSAE(sae, parsed[0], parsed[1], requested, sae_hook, source, facts, center_input=center)
    _check_same_tensor(loaded, where)
    return loaded


def _sae_hook_of(sae: SAE[Any], source: str, where: str) -> str:
    hook = sae.cfg.metadata.hook_name
    if not hook:
        raise ResourceError(
            f"The SAE from {source} has no hook name in its metadata (cfg.json: metadata.hook_name), "
            f'needed by {where}.\nAdd `"metadata": {{"hook_name": "blocks.6.hook_resid_post"}}` '
            "(the hook it was trained on) to its cfg.json."
        )
    if hook.endswith("hook_z") or sae.cfg.reshape_activations == "hook_z" or parse_hook(hook) is None:
        sites = ", ".join(f"blocks.L.{h}" for h in SAE_SITES.values())
        raise ResourceError(
            f"The SAE from {source} reads {hook}, which {where} does not support.\nSupported hooks: {sites}."
        )
    return str(hook)


def _check_fits_model(ctx: StepContext, loaded: LoadedSAE, where: str) -> None:
    model = ctx.model
    if loaded.layer >= model.n_layers:
        raise ResourceError(
            f"{where}: layer {loaded.layer} does not exist in model {model.name!r}, which has "
            f"{model.n_layers} layers (0-{model.n_layers - 1}).\nSet `layers` within that range."
        )
    width = model.model.cfg.d_mlp if loaded.site == "mlp_post" else model.model.cfg.d_model
    if loaded.sae.cfg.d_in != width:
        trained = loaded.info.get("trained_on_model") or "another model"
        raise ResourceError(
            f"{where}: the SAE from {loaded.source} reads {loaded.sae.cfg.d_in}-dimensional activations "
            f"(trained on {trained}); {loaded.hook_name} of model {model.name!r} has {width}.\n"
            "Use an SAE trained on this model (a `train_sae` step makes one), or the model the SAE was "
            "trained on."
        )
    trained_on = loaded.info.get("trained_on_model")
    if trained_on and str(trained_on).lower() not in {model.name.lower(), model.model.cfg.model_name.lower()}:
        ctx.note(
            f"The SAE for layer {loaded.layer} was trained on {trained_on!r}; this case runs {model.name!r}."
        )
    if loaded.center_input and model.model.cfg.normalization_type not in ("LN", "LNPre"):
        ctx.note(
            f"The SAE for layer {loaded.layer} was trained with centered writing weights, which is only "
            "equivalent for LayerNorm models; its inputs are centered anyway."
        )


def _dtype_name(ctx: StepContext) -> str:
    return str(ctx.model.model.cfg.dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# SAELens pretrained releases (online)


def _from_release(
    ctx: StepContext, source: SAESource, layers: tuple[int, ...] | None, site: str | None, where: str
) -> list[LoadedSAE]:
    release = str(source.release)
    entry = known_releases().get(release)
    if entry is None:
        raise ResourceError(f"{where}: unknown SAELens release {release!r}.\nCheck `sae.release`.")
    ids = {str(item["id"]): item for item in entry.get("saes", [])}
    out = []
    for layer, sae_id in _release_ids(source, ids, layers, site, ctx.model.n_layers, where):
        folder = str(ids[sae_id].get("path", sae_id))
        key = ("sae", "release", release, sae_id, ctx.device, _dtype_name(ctx))
        sae = ctx.cached(key, functools.partial(_load_release, ctx, release, sae_id, entry, folder))
        info = {"release": release, "id": sae_id, "repo_id": entry.get("repo_id")}
        out.append(_loaded(sae, layer, site, f"SAELens release {release}, id {sae_id}", info, where))
    return out


def _release_ids(
    source: SAESource,
    ids: dict[str, Any],
    layers: tuple[int, ...] | None,
    site: str | None,
    n_layers: int,
    where: str,
) -> list[tuple[int | None, str]]:
    """(requested layer, SAE id) for every layer to load, before anything is downloaded."""
    if source.id is not None:
        return _templated(source.id, source.release or "", ids, layers, where)
    pairs = _match(list(ids), layers, site, n_layers)
    missing = [hook for hook, sae_id in pairs if not sae_id]
    if missing or not pairs:
        sample = ", ".join(list(ids)[:12]) + (", ..." if len(ids) > 12 else "")
        wanted = ", ".join(missing) if missing else f"site {site}"
        raise ResourceError(
            f"{where}: SAELens release {source.release!r} has no SAE for {wanted} "
            "(nor for the identical resid_pre/resid_post of the next/previous layer).\n"
            f"Its SAE ids: {sample}\n"
            "Pick `layers` and `hook` it covers, or name the SAE with a per-layer template, e.g. "
            '`sae: {release: ..., id: "layer_{layer}/width_16k/canonical"}`.'
        )
    return [((parse_hook(requested) or (None,))[0], sae_id) for requested, sae_id in pairs]


def _templated(
    template: str, release: str, ids: dict[str, Any], layers: tuple[int, ...] | None, where: str
) -> list[tuple[int | None, str]]:
    if layers is None and "{layer}" in template:
        raise ResourceError(
            f"{where}: `sae.id` {template!r} is a per-layer template, but no `layers` are given.\n"
            "Set `layers` (e.g. '0-11')."
        )
    chosen: tuple[int | None, ...] = layers if "{layer}" in template and layers is not None else (None,)
    if "{layer}" not in template and layers is not None:
        chosen = layers[:1]
    pairs = []
    for layer in chosen:
        sae_id = template.replace("{layer}", str(layer))
        if sae_id not in ids:
            close = difflib.get_close_matches(sae_id, list(ids), n=3, cutoff=0.5)
            hint = f" Close ids: {', '.join(close)}." if close else ""
            raise ResourceError(
                f"{where}: SAELens release {release!r} has no SAE with id {sae_id!r}.{hint}\n"
                "Check `sae.id` (sae_lens/pretrained_saes.yaml lists every id of every release)."
            )
        pairs.append((layer, sae_id))
    return pairs


def _check_same_tensor(loaded: LoadedSAE, where: str) -> None:
    """The SAE's own hook must be the requested one or its twin (the hook comes from the SAE)."""
    if loaded.sae_hook not in equivalent_hooks(loaded.hook_name):
        twins = " or ".join(equivalent_hooks(loaded.hook_name))
        raise ResourceError(
            f"{where}: the SAE from {loaded.source} was trained on {loaded.sae_hook}, but layer "
            f"{loaded.layer} asks for {loaded.hook_name}.\nAn SAE only reconstructs the activations it was "
            f"trained on: use an SAE for {twins}, or set `hook` and `layers` to match the SAE "
            "(leave `hook` out to use the SAE's own)."
        )


def _load_release(
    ctx: StepContext, release: str, sae_id: str, entry: dict[str, Any], folder: str
) -> SAE[Any]:
    from runner.models import _hub_offline, hub_reachable

    repo_id = str(entry.get("repo_id", ""))
    cached = _release_cached(repo_id, folder)
    online = cached or hub_reachable()
    if not online:
        raise ResourceError(
            f"Cannot load SAE {sae_id!r} of SAELens release {release!r}: it must be downloaded from the "
            f"Hugging Face hub ({repo_id}), which is not reachable from this machine, and it is not in the "
            f"local Hugging Face cache.\n{OFFLINE_ALTERNATIVES}"
        )
    from sae_lens import SAE

    try:
        with _hub_offline(cached):
            sae = SAE.from_pretrained(release, sae_id, device=ctx.device, dtype=_dtype_name(ctx))
    except Exception as exc:  # hub, auth and conversion errors reach the user the same way
        raise ResourceError(
            f"Cannot load SAE {sae_id!r} of SAELens release {release!r}: {type(exc).__name__}: {exc}\n"
            f"{OFFLINE_ALTERNATIVES}"
        ) from exc
    return sae.eval()


def _release_cached(repo_id: str, folder: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    return isinstance(try_to_load_from_cache(repo_id, f"{prefix}{SAE_CFG_FILE}"), str)


# ----------------------------------------------------------------------------------------------
# Local SAELens directories


def _from_path(
    ctx: StepContext, template: str, layers: tuple[int, ...] | None, site: str | None, where: str
) -> list[LoadedSAE]:
    per_layer = "{layer}" in template
    if per_layer and layers is None:
        raise ResourceError(
            f"{where}: `sae.path` {template!r} is a per-layer template, but no `layers` are given.\n"
            "Set `layers` (e.g. '6' or '3,6,9')."
        )
    if not per_layer and layers is not None and len(layers) > 1:
        raise ResourceError(
            f"{where}: `sae.path` {template!r} names one SAE, but {len(layers)} layers are requested "
            f"({', '.join(map(str, layers))}).\nPut `{{layer}}` in the path (one directory per layer) or "
            "request the SAE's one layer."
        )
    chosen: tuple[int | None, ...] = layers if layers is not None else (None,)
    out = []
    for layer in chosen:
        text = template.replace("{layer}", str(layer))
        directory = _resolve_dir(ctx, text, where)
        key = ("sae", "path", str(directory), _mtime(directory), ctx.device, _dtype_name(ctx))
        sae = ctx.cached(key, functools.partial(_load_directory, ctx, directory, where))
        out.append(_loaded(sae, layer, site, f"directory {text}", {"path": str(directory)}, where))
    return out


def _resolve_dir(ctx: StepContext, text: str, where: str) -> Path:
    path = Path(text).expanduser()
    base = ctx.spec_dir
    directory = path if path.is_absolute() else (base / path)
    if not directory.is_dir():
        raise ResourceError(
            f"{where}: no SAE directory at {directory} (`sae.path: {text}`, relative to {base}).\n"
            f"An SAE directory holds {SAE_CFG_FILE} and {SAE_WEIGHTS_FILE}, as SAELens' "
            "`sae.save_model(dir)` writes them and a `train_sae` step writes them under data/<case id>/."
        )
    missing = [name for name in (SAE_CFG_FILE, SAE_WEIGHTS_FILE) if not (directory / name).is_file()]
    if missing:
        raise ResourceError(
            f"{where}: the SAE directory {directory} has no {' and no '.join(missing)}.\n"
            f"An SAE directory holds {SAE_CFG_FILE} and {SAE_WEIGHTS_FILE} (SAELens' `save_model` format)."
        )
    return directory.resolve()


def _mtime(directory: Path) -> float:
    return max((directory / name).stat().st_mtime for name in (SAE_CFG_FILE, SAE_WEIGHTS_FILE))


def _load_directory(ctx: StepContext, directory: Path, where: str) -> SAE[Any]:
    from sae_lens import SAE

    try:
        sae = SAE.load_from_disk(directory, device=ctx.device, dtype=_dtype_name(ctx))
    except Exception as exc:  # malformed cfg.json or weights: say which file and what SAELens said
        raise ResourceError(
            f"{where}: SAELens cannot load the SAE in {directory}: {type(exc).__name__}: {exc}\n"
            f"Check its {SAE_CFG_FILE} (architecture, d_in, d_sae, metadata.hook_name) and weights."
        ) from exc
    return sae.eval()


# ----------------------------------------------------------------------------------------------
# SAEs trained by an earlier step of the run


def _from_step(
    ctx: StepContext, step_id: str, layers: tuple[int, ...] | None, site: str | None, where: str
) -> list[LoadedSAE]:
    by_hook: dict[str, tuple[str, dict[str, Any], dict[str, torch.Tensor]]] = {}
    for case in ctx.outputs(step_id):
        cfg, weights = case.output.data.get(SAE_CFG_FILE), case.output.data.get(SAE_WEIGHTS_FILE)
        if not isinstance(cfg, dict) or not isinstance(weights, dict):
            raise ResourceError(
                f"{where}: step {step_id!r} (case {case.id}) produced no SAE ({SAE_CFG_FILE} and "
                f"{SAE_WEIGHTS_FILE}).\n`sae: {{from_step: ...}}` must name a `train_sae` step."
            )
        by_hook[str((cfg.get("metadata") or {}).get("hook_name", ""))] = (case.id, cfg, weights)
    pairs = _match(list(by_hook), layers, site, ctx.model.n_layers)
    missing = [hook for hook, found in pairs if not found]
    if missing or not pairs:
        wanted = ", ".join(missing) if missing else f"site {site}"
        raise ResourceError(
            f"{where}: step {step_id!r} trained no SAE for {wanted}; it trained SAEs for "
            f"{', '.join(sorted(by_hook))}.\nSweep its `layer` (and `site`) to cover the layers this step "
            "uses, or leave `layers` out to use the SAEs it trained."
        )
    out = []
    for requested, hook in pairs:
        case_id, cfg, weights = by_hook[hook]
        key = ("sae", "step", step_id, case_id, ctx.device, _dtype_name(ctx))
        sae = ctx.cached(key, functools.partial(_sae_from_data, ctx, cfg, weights))
        layer = (parse_hook(requested) or (None,))[0]
        out.append(_loaded(sae, layer, site, f"step {step_id} case {case_id}", {"case": case_id}, where))
    return out


def _sae_from_data(ctx: StepContext, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> SAE[Any]:
    """An SAE from a train_sae step's in-memory data files (the same bytes it wrote to disk)."""
    from sae_lens import SAE

    dtype = ctx.model.model.cfg.dtype
    sae = SAE.from_dict({**cfg, "device": ctx.device, "dtype": _dtype_name(ctx)})
    sae.load_state_dict({k: v.to(device=ctx.device, dtype=dtype) for k, v in weights.items()})
    return sae.eval()
