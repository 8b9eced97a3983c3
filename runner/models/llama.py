"""Llama-architecture conversion: a transformers ``LlamaForCausalLM`` (or its config) to TransformerLens.

Used for GGUF files and Llama checkpoint directories. Weights stay raw: no layer-norm folding and
no centering, because analyses edit MLP weights and read them back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from runner.errors import ResourceError
from runner.models.naming import EMBEDDED_MODEL

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def llama_config_dict(hf_config: Any, *, model_name: str, tokenizer: Any) -> dict[str, Any]:
    """A JSON-able ``HookedTransformerConfig`` dict for a transformers ``LlamaConfig``.

    Mirrors the ``LlamaForCausalLM`` branch of TransformerLens' ``convert_hf_model_config``, which
    only works for names it knows. Raises :class:`ResourceError` for Llama variants it cannot
    represent exactly (biases, unsupported RoPE scaling) rather than converting them wrongly.
    """
    _check_llama_config(hf_config)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    n_kv = hf_config.num_key_value_heads or hf_config.num_attention_heads
    cfg = {
        "model_name": model_name,
        "original_architecture": "LlamaForCausalLM",
        "d_model": hf_config.hidden_size,
        "d_head": head_dim,
        "n_heads": hf_config.num_attention_heads,
        # TransformerLens uses grouped-query attention exactly when this is not None.
        "n_key_value_heads": n_kv if n_kv != hf_config.num_attention_heads else None,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "d_vocab": hf_config.vocab_size,
        "eps": hf_config.rms_norm_eps,
        "act_fn": hf_config.hidden_act,
        "normalization_type": "RMS",
        "final_rms": True,
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,  # HF Llama rotates the two halves of each head
        "rotary_dim": head_dim,
        "rotary_base": _rope_parameters(hf_config)["rope_theta"],
        # Prepend BOS in to_tokens only if the model's own tokenizer does (SmolLM2's does not).
        "default_prepend_bos": tokenizer_adds_bos(tokenizer),
        "init_weights": False,  # the weights are loaded right after; random init is wasted time
    }
    cfg.update(_llama3_rope_fields(hf_config))
    return cfg


def _check_llama_config(hf_config: Any) -> None:
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

    model_type = getattr(hf_config, "model_type", None)
    problems = []
    if model_type != "llama":
        problems.append(f"its architecture is '{model_type}', not 'llama'")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        problems.append("it has attention or MLP biases, which the Llama conversion would drop")
    if getattr(hf_config, "hidden_act", None) not in SUPPORTED_ACTIVATIONS:
        problems.append(f"its activation '{getattr(hf_config, 'hidden_act', None)}' is not supported")
    rope_type = _rope_parameters(hf_config).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        problems.append(f"its RoPE scaling '{rope_type}' is not supported")
    if problems:
        raise ResourceError(
            f"Cannot convert this model to TransformerLens: {'; '.join(problems)}.\n"
            "The built-in conversion handles plain Llama-architecture models (like SmolLM2 and Llama 2/3).\n"
            f"Use a TransformerLens model name for other models, or `{EMBEDDED_MODEL}`."
        )


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """RoPE settings; transformers 5 keeps them in ``rope_parameters``, 4.x in ``rope_theta``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    return params


def _llama3_rope_fields(hf_config: Any) -> dict[str, Any]:
    params = _rope_parameters(hf_config)
    if params.get("rope_type") != "llama3":
        return {}
    return {
        "use_NTK_by_parts_rope": True,
        "NTK_original_ctx_len": params.get(
            "original_max_position_embeddings", hf_config.max_position_embeddings
        ),
        "NTK_by_parts_low_freq_factor": params.get("low_freq_factor", 1.0),
        "NTK_by_parts_high_freq_factor": params.get("high_freq_factor", 4.0),
        "NTK_by_parts_factor": params.get("factor", 1.0),
    }


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def convert_llama_state_dict(hf_model: PreTrainedModel, cfg_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    # Converted on the CPU in float32; load_raw_weights casts to the target device and dtype.
    cfg = HookedTransformerConfig.from_dict({**cfg_dict, "device": "cpu", "dtype": torch.float32})
    return convert_llama_weights(hf_model, cfg)


def hooked_llama_from_hf(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_name: str = "llama",
) -> HookedTransformer:
    """Convert a transformers ``LlamaForCausalLM`` to a ``HookedTransformer`` with raw weights."""
    cfg_dict = llama_config_dict(hf_model.config, model_name=model_name, tokenizer=tokenizer)
    state_dict = convert_llama_state_dict(hf_model, cfg_dict)
    model = new_hooked_transformer(cfg_dict, tokenizer, device, dtype)
    load_raw_weights(model, state_dict)
    return model.eval()


def new_hooked_transformer(
    cfg_dict: dict[str, Any], tokenizer: Any, device: str, dtype: torch.dtype
) -> HookedTransformer:
    """A ``HookedTransformer`` of ``cfg_dict``, its weights left uninitialised (``init_weights: False``)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig.from_dict({**cfg_dict, "device": device, "dtype": dtype})
    with one_torch_thread():
        return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with one torch thread: for many small operations, such as the rotary tables
    TransformerLens computes for every layer. Split over threads, each operation waits for all of
    them to be scheduled; on a busy machine that made building SmolLM2 1.7-2.5 s instead of 0.5 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_raw_weights(
    model: HookedTransformer, state_dict: dict[str, torch.Tensor], *, assign: bool = False
) -> None:
    """Load converted weights as they are: no layer-norm folding, no centering.

    Analyses edit MLP weights and must see the checkpoint's own weights (fold_ln would move the
    norm gains into W_in and W_gate). TransformerLens' ``load_and_process_state_dict`` with every
    option off does the same but calls ``load_state_dict`` once per key (8 s for SmolLM2).
    ``assign`` adopts the tensors instead of copying them: only for tensors that share no
    storage (a converted state dict's W_U is a view of W_E when embeddings are tied).
    """
    # fill_missing_keys adds the buffers (rotary tables, masks) and refuses missing weight matrices.
    full = model.fill_missing_keys(dict(state_dict))
    if assign:
        own = model.state_dict()
        full = {k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in full.items()}
    model.load_state_dict(full, strict=True, assign=assign)
