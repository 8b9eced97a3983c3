"""Tensor helpers shared by the SAE analyses: the unembedding's reused logits buffer."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from analyses._sae_tensors import Unembedding


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, d_head=4, n_heads=4, d_mlp=32, n_ctx=16, d_vocab=50, act_fn="gelu", seed=0
    )
    return HookedTransformer(cfg).eval()


def plain_logits(model: HookedTransformer, normed: torch.Tensor) -> torch.Tensor:
    """Independent of ``Unembedding``: ``normed @ W_U + b_U``."""
    return normed @ model.W_U.detach() + model.b_U.detach()


def test_a_zero_bias_is_dropped_and_a_real_one_kept(model: HookedTransformer) -> None:
    assert Unembedding.of(model).bias is None  # TransformerLens initializes b_U to zeros
    with torch.no_grad():
        model.b_U[3] = 0.5
    try:
        assert Unembedding.of(model).bias is not None
    finally:
        with torch.no_grad():
            model.b_U.zero_()


@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_scratch_logits_equal_the_unembedding_whatever_the_order_of_sizes(
    model: HookedTransformer, bias: float
) -> None:
    with torch.no_grad():
        model.b_U.fill_(bias)
        unembedding = Unembedding.of(model)
        model.b_U.zero_()
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (7, 9), (2, 1), (0, 4), (4, 11)]:  # grows, shrinks, empty, grows again
        normed = torch.randn(*shape, 16, generator=generator)
        got = unembedding.scratch_logits(normed)
        assert got.shape == (*shape, 50) and got.dtype == torch.float32
        expected = normed @ unembedding.weight.T + (bias if unembedding.bias is not None else 0.0)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            unembedding.scratch_logits(normed[:1]),
            plain_logits(model, normed[:1]) + bias,
            rtol=1e-6,
            atol=1e-6,
        )


def test_the_buffer_is_reused_not_reallocated(model: HookedTransformer) -> None:
    unembedding = Unembedding.of(model)
    first = unembedding.scratch_logits(torch.randn(6, 16))
    second = unembedding.scratch_logits(torch.randn(2, 3, 16))
    assert second.data_ptr() == first.data_ptr()
