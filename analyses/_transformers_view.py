"""A loaded model as a transformers ``PreTrainedModel``, for tools that need one (lm-eval's ``HFLM``).

:func:`transformers_view` builds it once per model. Its MLP down projections are the
``HookedTransformer``'s ``W_out`` tensors (shared storage), so zeroing an entry of ``W_out`` in
place changes both models; every other weight is a copy. A model loaded from a transformers
checkpoint gets that checkpoint's own model; other Llama-architecture models (the embedded one,
GGUF files) are rebuilt from their TransformerLens weights. Either way the view is checked to
compute the model's logits when it is built.

Only ``super_weights``' accuracy path uses it, so it lives with the analyses, not the engine.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any

import torch

from runner.errors import ResourceError
from runner.models.hub import hub_offline, in_hf_cache
from runner.models.loaded import LoadedModel

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedModel

__all__ = [
    "VIEW_CHECK_TOKENS",
    "VIEW_TOLERANCE",
    "build_transformers_view",
    "check_same_logits",
    "llama_transformers_view",
    "share_down_projections",
    "transformers_view",
]


def transformers_view(loaded: LoadedModel) -> PreTrainedModel:
    """``loaded`` as a transformers model sharing its down projections, built once per model.

    Raises :class:`ResourceError` when no view can be built, or when the view does not compute
    the model's logits.
    """
    return loaded.derived("transformers_view", lambda: build_transformers_view(loaded))


_CHECKPOINT_KINDS = ("local-dir", "transformer-lens", "hf-hub")
"""Kinds of model loaded from a transformers checkpoint, whose view is that checkpoint's own model."""


_DOWN_PROJECTIONS: dict[str, tuple[str, bool]] = {
    # architecture: (layer's down projection in the transformers model, its weight is W_out.T)
    **dict.fromkeys(
        (
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "OlmoForCausalLM",
            "Olmo2ForCausalLM",
            "Olmo3ForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "GemmaForCausalLM",
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "Phi3ForCausalLM",
            "ApertusForCausalLM",
        ),
        ("model.layers.{layer}.mlp.down_proj", True),  # nn.Linear: (d_model, d_mlp)
    ),
    "GPT2LMHeadModel": ("transformer.h.{layer}.mlp.c_proj", False),  # Conv1D: (d_mlp, d_model) = W_out
    "GPTNeoXForCausalLM": ("gpt_neox.layers.{layer}.mlp.dense_4h_to_h", True),
    "GPTNeoForCausalLM": ("transformer.h.{layer}.mlp.c_proj", True),
    "GPTJForCausalLM": ("transformer.h.{layer}.mlp.fc_out", True),
    "BloomForCausalLM": ("transformer.h.{layer}.mlp.dense_4h_to_h", True),
    "OPTForCausalLM": ("model.decoder.layers.{layer}.fc2", True),
    "PhiForCausalLM": ("model.layers.{layer}.mlp.fc2", True),
}
"""Where each architecture keeps layer L's MLP down projection, as TransformerLens' conversions read it:
TransformerLens stores it as ``W_out`` ``(d_mlp, d_model)``; ``nn.Linear`` stores the transpose."""


VIEW_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-3, 1e-3),
    torch.float16: (5e-2, 2e-2),
    torch.bfloat16: (1e-1, 5e-2),
}
"""``(atol, rtol)`` of the build-time check: the view's logits may differ from the model's by at most
``atol + rtol * max |logit|``. The two implementations order their float operations differently;
a conversion mistake (a wrong layout, norm or rotary setting) changes logits by far more."""


VIEW_CHECK_TOKENS = 16
"""Length of the random token sequence both models run for the build-time check."""


def build_transformers_view(loaded: LoadedModel) -> PreTrainedModel:
    """``loaded`` as a transformers ``PreTrainedModel`` whose down projections share ``W_out``'s storage.

    A model loaded from a transformers checkpoint (a hub name, from the local Hugging Face cache
    only, or a local checkpoint directory) gets the transformers model of that checkpoint, as the
    loader built it; other Llama-architecture models (the embedded one, GGUF files) are rebuilt from
    their TransformerLens weights. Either way the view is checked once to compute the model's
    logits (:func:`check_same_logits`). Use :func:`transformers_view`, which builds it once per model.
    """
    cfg = loaded.model.cfg
    if loaded.info.get("kind") in _CHECKPOINT_KINDS:
        view = _checkpoint_model(loaded)
        share_down_projections(loaded.model, view)
        check_same_logits(loaded.model, view, name=loaded.name)
        return view
    if cfg.original_architecture != "LlamaForCausalLM":
        raise ResourceError(
            f"Cannot build a transformers model for '{loaded.name}' "
            f"({cfg.original_architecture or 'architecture unknown'}): it was not loaded from a "
            "transformers checkpoint, and from TransformerLens weights alone only Llama-architecture "
            "models (RMSNorm, gated MLP, rotary) convert back.\n"
            "Tools that need a transformers model (lm-eval accuracy) need one; load the model by its "
            "Hugging Face id or from a checkpoint directory, or use a Llama-architecture model."
        )
    return llama_transformers_view(loaded.model, name=loaded.name)


def share_down_projections(model: HookedTransformer, view: Any) -> None:
    """Make every MLP down projection of the transformers ``view`` a view of ``model``'s ``W_out``.

    Each one must hold exactly the values of ``W_out`` (transposed where the architecture stores it
    so) before it is replaced; anything else means the two are not the same checkpoint or the layout
    is wrong, and raises :class:`ResourceError`.
    """
    architecture = model.cfg.original_architecture
    if architecture not in _DOWN_PROJECTIONS:
        raise ResourceError(
            f"Cannot share the MLP down projections of a {architecture} model with its transformers "
            "form: where this architecture keeps them is not known here.\n"
            f"Known architectures: {', '.join(sorted(_DOWN_PROJECTIONS))}."
        )
    path, transposed = _DOWN_PROJECTIONS[architecture]
    for layer, block in enumerate(model.blocks):
        w_out = getattr(block.mlp, "W_out", None)
        if not isinstance(w_out, torch.nn.Parameter) or w_out.ndim != 2:
            raise ResourceError(
                f"Cannot share layer {layer}'s MLP down projection: {type(block.mlp).__name__} has no "
                "single W_out of shape (d_mlp, d_model) (mixture-of-experts MLPs have one per expert)."
            )
        module = view.get_submodule(path.format(layer=layer))
        shared = w_out.T if transposed else w_out  # a view of W_out: same storage
        if module.weight.shape != shared.shape or not torch.equal(module.weight.detach(), shared.detach()):
            raise ResourceError(
                f"Cannot share layer {layer}'s MLP down projection: the transformers model's "
                f"{path.format(layer=layer)}.weight {tuple(module.weight.shape)} does not hold the values "
                f"of the HookedTransformer's W_out{'.T' if transposed else ''} {tuple(shared.shape)}.\n"
                "The checkpoint differs from the one the model was loaded from; load the model again."
            )
        module.weight = torch.nn.Parameter(shared, requires_grad=False)


def check_same_logits(model: HookedTransformer, view: Any, *, name: str) -> float:
    """Run both models on one random token sequence; their logits must agree (:data:`VIEW_TOLERANCE`).

    Returns the largest absolute difference; raises :class:`ResourceError` when it is too large.
    """
    cfg = model.cfg
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.d_vocab, (1, min(VIEW_CHECK_TOKENS, cfg.n_ctx)), generator=generator)
    tokens = tokens.to(next(model.parameters()).device)  # (1, pos)
    with torch.no_grad():
        expected = model(tokens).float()  # (1, pos, d_vocab)
        actual = view(tokens).logits.float()
    atol, rtol = VIEW_TOLERANCE.get(cfg.dtype, VIEW_TOLERANCE[torch.float32])
    if actual.shape != expected.shape:
        difference = math.inf
    else:
        difference = float((actual.to(expected.device) - expected).abs().max())
    limit = atol + rtol * float(expected.abs().max())
    if not difference <= limit:
        raise ResourceError(
            f"The transformers form of model '{name}' ({cfg.original_architecture}) does not compute the "
            f"same logits as its HookedTransformer: on {tokens.shape[1]} random tokens they differ by up to "
            f"{difference:.3g} (allowed: {limit:.3g}; shapes {tuple(actual.shape)} and "
            f"{tuple(expected.shape)}).\n"
            "Results of tools that run it (lm-eval accuracy) would not describe this model. "
            "Run without them (e.g. leave `accuracy_tasks` empty), or use another model."
        )
    return difference


def _checkpoint_model(loaded: LoadedModel) -> Any:
    """The transformers model of the checkpoint ``loaded`` came from, in its dtype, on its device.

    Read from the local directory or the local Hugging Face cache only: never downloaded.
    """
    from transformer_lens.loading_from_pretrained import NEED_REMOTE_CODE_MODELS
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, location, cfg = loaded.info["kind"], str(loaded.info["location"]), loaded.model.cfg
    if kind != "local-dir" and not in_hf_cache(location):
        raise ResourceError(
            f"Cannot build the transformers form of model '{loaded.name}': {location} is not in the local "
            "Hugging Face cache, and runner does not download it again.\n"
            "Load the model once online (it is cached then), or use a local checkpoint directory."
        )
    kwargs: dict[str, Any] = {
        "dtype": cfg.dtype,
        "local_files_only": True,
        "trust_remote_code": location.startswith(NEED_REMOTE_CODE_MODELS),
    }
    hf_model: Any  # mypy misreads transformers' decorated methods (see _construct)
    try:
        with hub_offline(True):
            try:
                hf_model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
            except AttributeError as exc:  # as TransformerLens does: old configs lack pad_token_id
                if "pad_token_id" not in str(exc):
                    raise
                config = AutoConfig.from_pretrained(location, local_files_only=True)
                config.pad_token_id = getattr(config, "pad_token_id", None)
                hf_model = AutoModelForCausalLM.from_pretrained(location, config=config, **kwargs)
    except Exception as exc:  # missing files, unreadable weights, unknown architectures: same advice
        raise ResourceError(
            f"Cannot build the transformers form of model '{loaded.name}' from {location}: "
            f"{type(exc).__name__}: {exc}\n"
            "It is read from the local checkpoint only. Check that the checkpoint is complete, or run "
            "without tools that need a transformers model (e.g. leave `accuracy_tasks` empty)."
        ) from exc
    return hf_model.to(cfg.device).eval()


def llama_transformers_view(model: HookedTransformer, *, name: str | None = None) -> PreTrainedModel:
    """A transformers ``LlamaForCausalLM`` rebuilt from a Llama-architecture ``HookedTransformer``.

    Its MLP down projections are views of ``model``'s ``W_out`` (``down_proj.weight = W_out.T``,
    sharing storage); the other weights are copies. Checked with :func:`check_same_logits`.
    """
    cfg = model.cfg
    llama = cfg.original_architecture == "LlamaForCausalLM" and cfg.gated_mlp
    if not llama or cfg.normalization_type != "RMS":
        raise ResourceError(
            f"Cannot build a transformers model from {cfg.model_name!r} ({cfg.original_architecture}): "
            "only Llama-architecture models (RMSNorm, gated MLP, rotary) convert back.\n"
            "Tools that need a transformers model (lm-eval accuracy) need one; use a Llama-architecture "
            "model such as smollm2-135m, or load the model by its Hugging Face id or checkpoint directory."
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    n_kv = cfg.n_key_value_heads or cfg.n_heads
    config = LlamaConfig(
        **_rope_kwargs(cfg, LlamaConfig),
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=int(cfg.d_mlp or 4 * cfg.d_model),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=n_kv,
        head_dim=cfg.d_head,
        max_position_embeddings=cfg.n_ctx,
        rms_norm_eps=cfg.eps,
        hidden_act=cfg.act_fn,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    skip_init: Any = _no_init_weights()
    with skip_init:  # every weight is overwritten below; random init would take seconds
        view = _construct(LlamaForCausalLM, config)
    view = view.to(device=cfg.device, dtype=cfg.dtype).eval()
    with torch.no_grad():
        _copy_llama_weights(model, view, n_kv)
    share_down_projections(model, view)
    check_same_logits(model, view, name=name or cfg.model_name)
    return view


def _rope_kwargs(cfg: Any, config_class: type) -> dict[str, Any]:
    """RoPE settings as ``LlamaConfig`` takes them: ``rope_parameters`` (transformers 5) or ``rope_theta``."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if cfg.use_NTK_by_parts_rope:
        params.update(
            rope_type="llama3",
            factor=cfg.NTK_by_parts_factor,
            low_freq_factor=cfg.NTK_by_parts_low_freq_factor,
            high_freq_factor=cfg.NTK_by_parts_high_freq_factor,
            original_max_position_embeddings=cfg.NTK_original_ctx_len,
        )
    if "rope_parameters" in inspect.signature(config_class).parameters:
        return {"rope_parameters": params}
    scaling = (
        None if params["rope_type"] == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    )
    return {"rope_theta": params["rope_theta"], "rope_scaling": scaling}


def _construct(model_class: Any, config: Any) -> Any:
    """``model_class(config)``; called through ``Any`` because mypy misreads transformers' decorators."""
    return model_class(config)


def _no_init_weights() -> Any:
    """transformers' context manager that skips random initialization (its module moved in 5.0)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    return no_init_weights()


def _copy_llama_weights(model: HookedTransformer, view: Any, n_kv: int) -> None:
    """The inverse of TransformerLens' ``convert_llama_weights``; down projections are shared afterwards."""
    view.model.embed_tokens.weight.copy_(model.embed.W_E)
    view.model.norm.weight.copy_(model.ln_final.w)
    view.lm_head.weight.copy_(model.unembed.W_U.T)
    for block, layer in zip(model.blocks, view.model.layers, strict=True):
        attn = block.attn
        w_k = getattr(attn, "_W_K", attn.W_K)[:n_kv]  # (n_kv, d_model, d_head) with grouped-query attention
        w_v = getattr(attn, "_W_V", attn.W_V)[:n_kv]
        layer.self_attn.q_proj.weight.copy_(
            attn.W_Q.permute(0, 2, 1).reshape(-1, attn.W_Q.shape[1])
        )  # (n h) m
        layer.self_attn.k_proj.weight.copy_(w_k.permute(0, 2, 1).reshape(-1, w_k.shape[1]))
        layer.self_attn.v_proj.weight.copy_(w_v.permute(0, 2, 1).reshape(-1, w_v.shape[1]))
        layer.self_attn.o_proj.weight.copy_(attn.W_O.reshape(-1, attn.W_O.shape[-1]).T)  # m (n h)
        layer.input_layernorm.weight.copy_(block.ln1.w)
        layer.post_attention_layernorm.weight.copy_(block.ln2.w)
        layer.mlp.gate_proj.weight.copy_(block.mlp.W_gate.T)
        layer.mlp.up_proj.weight.copy_(block.mlp.W_in.T)
        layer.mlp.down_proj.weight.copy_(block.mlp.W_out.T)  # replaced by a shared view right after
