"""Builders shared by test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

from typing import Any

import torch

N_LAYERS = 3


def make_model(**overrides: Any) -> Any:
    """A random 3-layer ``HookedTransformer`` with every weight, bias and norm scale randomized (TL
    initializes biases to zero and norms to one, which would hide a bias or norm mix-up)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    settings: dict[str, Any] = {
        "n_layers": N_LAYERS,
        "d_model": 48,
        "d_mlp": 96,
        "n_heads": 6,
        "d_head": 8,
        "n_ctx": 64,
        "d_vocab": 101,
        "act_fn": "gelu_new",
        "normalization_type": "LN",
        "seed": 0,
        "device": "cpu",
    }
    model = HookedTransformer(HookedTransformerConfig(**{**settings, **overrides})).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("blocks."):
                scale = 0.3 if param.ndim > 1 else 0.5
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(1.0 + noise if name.endswith(".w") else noise)
    return model


LEAN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": {},
    "llama": {
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": 8,
        "gated_mlp": True,
        "act_fn": "silu",
        "n_key_value_heads": 2,
    },
    "gptj_rotary": {  # rotary on part of each head, adjacent pairs, one key-value head
        "positional_embedding_type": "rotary",
        "rotary_dim": 4,
        "rotary_adjacent_pairs": True,
        "n_key_value_heads": 1,
    },
}
