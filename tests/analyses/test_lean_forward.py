"""The lean block forward of the interventions' fast path against TransformerLens' own forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from analyses._lean_forward import LeanForward, unsupported_reason
from tests.helpers import LEAN_ARCHITECTURES, N_LAYERS, make_model

ARCHITECTURES = LEAN_ARCHITECTURES


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def model(request: pytest.FixtureRequest) -> Any:
    return make_model(**ARCHITECTURES[request.param])


def reference(model: Any, tokens: torch.Tensor, lean: LeanForward) -> tuple[dict[str, torch.Tensor], Any]:
    """TransformerLens' forward over the whole passages, keeping what the lean pass starts from."""
    names = {f"blocks.{layer}.hook_resid_pre" for layer in range(N_LAYERS)}
    for layer in range(N_LAYERS):
        names |= {lean.key_hook(layer), f"blocks.{layer}.attn.hook_v"}
    with torch.no_grad():
        final, cache = model.run_with_cache(tokens, stop_at_layer=N_LAYERS, names_filter=lambda n: n in names)
    return {name: cache[name] for name in names}, final


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding: 1e-5 of the largest |activation| (the random weights make some large)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def tokens_of(model: Any, n: int = 3, length: int = 14) -> torch.Tensor:
    return torch.randint(model.cfg.d_vocab, (n, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(("start", "offset"), [(0, 0), (0, 5), (1, 9), (2, 13)])
def test_lean_pass_matches_transformer_lens_from_any_block_and_position(
    model: Any, start: int, offset: int
) -> None:
    lean = LeanForward.of(model)
    assert lean is not None, unsupported_reason(model)
    tokens = tokens_of(model)
    acts, final = reference(model, tokens, lean)
    prefix = [
        (acts[lean.key_hook(layer)][:, :offset], acts[f"blocks.{layer}.attn.hook_v"][:, :offset])
        for layer in range(start, N_LAYERS)
    ]
    with torch.no_grad():
        got = lean.run(acts[f"blocks.{start}.hook_resid_pre"][:, offset:], start, N_LAYERS, prefix or None)
    assert_close(got, final[:, offset:])


@pytest.mark.parametrize("offset", [0, 6])
def test_block_hooks_edit_the_lean_pass_as_they_edit_transformer_lens(model: Any, offset: int) -> None:
    lean = LeanForward.of(model)
    assert lean is not None
    shift = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    hooks = [
        ("blocks.0.hook_resid_pre", lambda act, hook: act * 1.5),
        ("blocks.0.hook_attn_out", lambda act, hook: act + shift),
        ("blocks.0.mlp.hook_pre", lambda act, hook: act - 0.2),
        ("blocks.1.mlp.hook_post", lambda act, hook: act * 0.5),
        ("blocks.1.hook_mlp_out", lambda act, hook: act + 2 * shift),
        ("blocks.2.hook_resid_mid", lambda act, hook: act - shift),
        ("blocks.2.hook_resid_post", lambda act, hook: act * 0.9),
    ]
    if model.cfg.gated_mlp:
        hooks.append(("blocks.2.mlp.hook_pre_linear", lambda act, hook: act * 2))
    tokens = tokens_of(model)
    with torch.no_grad():
        plain = model(tokens, stop_at_layer=N_LAYERS)
        with model.hooks(fwd_hooks=hooks):
            acts, expected = reference(model, tokens, lean)  # TL's forward, hooked
            prefix = [
                (
                    acts[lean.key_hook(layer)][:, :offset],
                    acts[f"blocks.{layer}.attn.hook_v"][:, :offset],
                )
                for layer in range(N_LAYERS)
            ]
            start = model(tokens, stop_at_layer=0)[:, offset:]  # the embeddings, before any hook
            got = lean.run(start, 0, N_LAYERS, prefix if offset else None)
    assert not torch.allclose(expected, plain, atol=1e-3)
    assert_close(got, expected[:, offset:])


def test_lean_pass_reads_the_live_weights() -> None:
    """Weight edits (zeroing a super weight, say) reach the lean pass: its joined Q, K, V copy is rebuilt."""
    model = make_model(**ARCHITECTURES["llama"])
    lean = LeanForward.of(model)
    assert lean is not None
    tokens = tokens_of(model)
    with torch.no_grad():
        start = model(tokens, stop_at_layer=0)
        before = lean.run(start, 0, N_LAYERS)
        model.blocks[1].mlp.W_out[3, 5] = 40.0
        model.blocks[0].attn.W_Q[2, 1, 4] = -7.0
        model.blocks[2].attn._W_K[1, 0, 2] = 9.0  # a grouped key head
        model.blocks[0].attn._b_V[0, 3] = -5.0
        model.blocks[1].mlp.b_in[7] = 3.0
        after = lean.run(start, 0, N_LAYERS)
        expected = model(tokens, stop_at_layer=N_LAYERS)
    assert not torch.allclose(before, after, atol=1e-3)
    assert_close(after, expected)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"attn_scores_soft_cap": 30.0}, "attn_scores_soft_cap"),
        ({"parallel_attn_mlp": True}, "parallel_attn_mlp"),
        ({"use_qk_norm": True, "n_key_value_heads": 2}, "use_qk_norm"),
        ({"positional_embedding_type": "alibi"}, "alibi"),
        ({"act_fn": "solu_ln", "d_mlp": 96}, "layer-norm activation"),
        (
            {"use_local_attn": True, "attn_types": ["global", "local", "global"], "window_size": 4},
            "use_local_attn",
        ),
        ({"original_architecture": "Olmo2ForCausalLM"}, "Olmo2ForCausalLM"),
    ],
)
def test_unsupported_configurations_are_refused_with_the_reason(
    overrides: dict[str, Any], named: str
) -> None:
    model = make_model(**overrides)
    reason = unsupported_reason(model)
    assert reason is not None and named in reason
    assert LeanForward.of(model) is None


def test_a_lean_pass_that_disagrees_with_transformer_lens_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make_model()
    assert LeanForward.of(model) is not None
    original = LeanForward._mlp
    monkeypatch.setattr(
        LeanForward, "_mlp", lambda self, layer, x, *rest: original(self, layer, x, *rest) * 1.001
    )
    refusal = LeanForward.refusal(model)
    assert refusal is not None and "differed from TransformerLens' forward by" in refusal
    assert LeanForward.of(model) is None


def test_a_check_that_fails_to_run_refuses_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> torch.Tensor:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(LeanForward, "_attention", broken)
    refusal = LeanForward.refusal(make_model())
    assert refusal is not None and "raised RuntimeError('shape mismatch')" in refusal


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_checked_in_float32_on_their_architecture(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    model = make_model(**ARCHITECTURES["llama"], dtype=dtype)
    assert LeanForward.refusal(model) is None
    # An error of 1% hides in 16-bit rounding (the model's own check allows 10%); the float32
    # model of the same architecture shows it.
    original = LeanForward._mlp
    monkeypatch.setattr(
        LeanForward, "_mlp", lambda self, layer, x, *rest: original(self, layer, x, *rest) * 1.01
    )
    assert LeanForward(model).max_difference() < 0.1
    refusal = LeanForward.refusal(model)
    assert refusal is not None and "on a random float32 model of the same architecture" in refusal
