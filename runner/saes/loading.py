"""Loading SAEs for a case: one :class:`LoadedSAE` per requested layer, each loaded once per run.

:func:`load_saes` resolves a request (layers and a hook site) against an :class:`SAESource`. The
hook always comes from the SAE's own metadata (``cfg.metadata.hook_name``). A request for another
hook is an error, except for the one identity TransformerLens guarantees:
``blocks.{L}.hook_resid_post`` is the same tensor as ``blocks.{L+1}.hook_resid_pre``. So "resid_post
of layer 5" is served by an SAE trained on ``blocks.6.hook_resid_pre`` (``gpt2-small-res-jb`` has
only resid_pre SAEs, plus resid_post of layer 11), and the case says so in a note.

Analyses reach this through ``ctx.saes(...)`` (declaring ``needs=(..., "saes")``); sae_lens is
imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runner.errors import ResourceError
from runner.hooks import SITE_HOOKS, equivalent_hooks, hook_name, parse_hook, require_layers
from runner.registry import close_matches
from runner.saes import SAESource, TrainedSAE, known_releases, shipped_sae_dir
from runner.saes.dictionary_learning import dictionary_learning_sae, is_dictionary_learning_dir

if TYPE_CHECKING:
    from sae_lens import SAE

    from runner.step import StepContext

__all__ = ["LoadedSAE", "load_saes"]

SAE_WEIGHTS_FILE = "sae_weights.safetensors"
SAE_CFG_FILE = "cfg.json"
SAE_FILES = (SAE_CFG_FILE, SAE_WEIGHTS_FILE)
"""A SAELens directory (``sae.save_model(dir)``)."""
DICTIONARY_LEARNING_FILES = ("config.json", "ae.pt")
"""A dictionary_learning checkpoint (``runner/saes/dictionary_learning.py``)."""
OFFLINE_ALTERNATIVES = (
    "Use an SAE that loads offline instead:\n"
    "  sae: {name: smollm2-135m/blocks.12.hook_resid_post}  # shipped with runner, for smollm2-135m\n"
    "  sae: {path: path/to/sae-dir}           # any SAELens directory (cfg.json + sae_weights.safetensors)\n"
    "  sae: {from_step: train}                # trained by an earlier `train_sae` step of the spec"
)


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
    elif source.name is not None:
        saes = _from_path(ctx, source.name, layers, site, where, shipped=True)
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
    return hook_name(site or own[1], own[0] if layer is None else layer)


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
        requested = _requested_for(chosen, layer, site) if chosen else hook_name(site or "resid_pre", layer)
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
        sites = ", ".join(f"blocks.L.{h}" for h in SITE_HOOKS.values())
        raise ResourceError(
            f"The SAE from {source} reads {hook}, which {where} does not support.\nSupported hooks: {sites}."
        )
    return str(hook)


def _check_fits_model(ctx: StepContext, loaded: LoadedSAE, where: str) -> None:
    model = ctx.model
    require_layers([loaded.layer], model.n_layers, model=model.name, where=where)
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
            close = close_matches(sae_id, list(ids), cutoff=0.5)
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
    from runner.models.hub import hub_offline, hub_reachable

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
        with hub_offline(cached):
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
    ctx: StepContext,
    template: str,
    layers: tuple[int, ...] | None,
    site: str | None,
    where: str,
    *,
    shipped: bool = False,
) -> list[LoadedSAE]:
    """SAEs from local directories (``sae.path``) or shipped with runner (``sae.name``)."""
    per_layer = "{layer}" in template
    field_name = "sae.name" if shipped else "sae.path"
    if per_layer and layers is None:
        raise ResourceError(
            f"{where}: `{field_name}` {template!r} is a per-layer template, but no `layers` are given.\n"
            "Set `layers` (e.g. '6' or '3,6,9')."
        )
    if not per_layer and layers is not None and len(layers) > 1:
        raise ResourceError(
            f"{where}: `{field_name}` {template!r} names one SAE, but {len(layers)} layers are requested "
            f"({', '.join(map(str, layers))}).\nPut `{{layer}}` in the path (one directory per layer) or "
            "request the SAE's one layer."
        )
    chosen: tuple[int | None, ...] = layers if layers is not None else (None,)
    out = []
    for layer in chosen:
        text = template.replace("{layer}", str(layer))
        directory = _shipped_dir(text, where) if shipped else _resolve_dir(ctx, text, where)
        files = DICTIONARY_LEARNING_FILES if is_dictionary_learning_dir(directory) else SAE_FILES
        key = ("sae", "path", str(directory), _mtime(directory, files), ctx.device, _dtype_name(ctx))
        load = _load_dictionary_learning if files == DICTIONARY_LEARNING_FILES else _load_directory
        sae = ctx.cached(key, functools.partial(load, ctx, directory, where))
        info: dict[str, Any] = {"name": text} if shipped else {}
        info["path"] = str(directory)
        info["sha256"] = ctx.cached(("sae sha256", *key), functools.partial(_hashes, directory, files))
        if files == DICTIONARY_LEARNING_FILES:
            info["format"] = "dictionary_learning"
        origin = f"shipped SAE {text}" if shipped else f"directory {text}"
        if files == DICTIONARY_LEARNING_FILES:
            origin = f"dictionary_learning checkpoint {directory / 'ae.pt'}"
        out.append(_loaded(sae, layer, site, origin, info, where))
    return out


def _shipped_dir(name: str, where: str) -> Path:
    try:
        return shipped_sae_dir(name)
    except ValueError as exc:
        raise ResourceError(f"{where}: {exc}") from None


def _hashes(directory: Path, files: tuple[str, ...] = SAE_FILES) -> dict[str, str]:
    """sha256 of the SAE's config and weights: what the manifest pins."""
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in files}


def _resolve_dir(ctx: StepContext, text: str, where: str) -> Path:
    path = Path(text).expanduser()
    base = ctx.spec_dir
    directory = path if path.is_absolute() else (base / path)
    if directory.is_dir() and is_dictionary_learning_dir(directory):
        return directory.resolve()
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


def _mtime(directory: Path, files: tuple[str, ...] = SAE_FILES) -> float:
    return max((directory / name).stat().st_mtime for name in files)


def _load_dictionary_learning(ctx: StepContext, directory: Path, where: str) -> SAE[Any]:
    """A dictionary_learning checkpoint (``ae.pt`` + ``config.json``) as the SAELens SAE of the same
    computation (``runner/saes/dictionary_learning.py``); its errors name the file."""
    try:
        return dictionary_learning_sae(directory, ctx.device, _dtype_name(ctx))
    except ResourceError as exc:
        raise ResourceError(f"{where}: {exc}") from None


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
    by_hook: dict[str, tuple[str, TrainedSAE]] = {}
    for case in ctx.outputs(step_id, TrainedSAE):
        by_hook[case.result.sae_hook] = (case.id, case.result)
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
        case_id, trained = by_hook[hook]
        key = ("sae", "step", step_id, case_id, ctx.device, _dtype_name(ctx))
        sae = ctx.cached(key, functools.partial(_sae_from_result, ctx, trained))
        layer = (parse_hook(requested) or (None,))[0]
        out.append(_loaded(sae, layer, site, f"step {step_id} case {case_id}", {"case": case_id}, where))
    return out


def _sae_from_result(ctx: StepContext, trained: TrainedSAE) -> SAE[Any]:
    """An SAE from an earlier step's typed result (its SAELens config and weights)."""
    from sae_lens import SAE

    dtype = ctx.model.model.cfg.dtype
    sae = SAE.from_dict({**trained.sae_cfg, "device": ctx.device, "dtype": _dtype_name(ctx)})
    weights = {
        k: torch.from_numpy(v).to(device=ctx.device, dtype=dtype) for k, v in trained.sae_weights.items()
    }
    sae.load_state_dict(weights)
    return sae.eval()
