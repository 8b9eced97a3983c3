"""SAE sources: validation, hook resolution (resid_post L = resid_pre L+1), loading once per run, errors."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from runner.datasets import TokenDataset
from runner.errors import ResourceError
from runner.hooks import equivalent_hooks, hook_name, parse_hook
from runner.models import LoadedModel
from runner.results import StepResult
from runner.saes import SAESource, TrainedSAE, known_releases, release_names, shipped_saes
from runner.saes import loading as saes_module
from runner.saes.loading import load_saes
from runner.step import FinishedCase, StepContext


def make_sae(hook: str | None, d_in: int = 32, d_sae: int = 16, seed: int = 0) -> Any:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    metadata = SAEMetadata(hook_name=hook, model_name="tiny") if hook else SAEMetadata(model_name="tiny")
    return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata)).eval()


def save_sae(directory: Path, hook: str | None, **kwargs: Any) -> Path:
    make_sae(hook, **kwargs).save_model(directory)
    return directory


def context(loaded: LoadedModel, spec_dir: Path | None = None, finished: Any = None) -> StepContext:
    dataset = TokenDataset("random", torch.zeros((1, 4), dtype=torch.long), "x")
    return StepContext.standalone(
        model=loaded, dataset=dataset, case_id="case[x]", finished=finished, spec_dir=spec_dir
    )


def load(
    ctx: StepContext, layers: tuple[int, ...] | None = None, site: str | None = None, **source: Any
) -> Any:
    return load_saes(ctx, SAESource(**source), layers=layers, site=site, where="test step")


# --- hook names ----------------------------------------------------------------------------------


def test_parse_hook_reads_layer_and_site() -> None:
    assert parse_hook("blocks.6.hook_resid_post") == (6, "resid_post")
    assert parse_hook("blocks.3.mlp.hook_post") == (3, "mlp_post")
    assert parse_hook("blocks.3.attn.hook_z") is None
    assert parse_hook("hook_embed") is None


def test_resid_post_and_next_resid_pre_are_twins() -> None:
    assert equivalent_hooks("blocks.5.hook_resid_post") == [
        "blocks.5.hook_resid_post",
        "blocks.6.hook_resid_pre",
    ]
    assert equivalent_hooks("blocks.6.hook_resid_pre") == [
        "blocks.6.hook_resid_pre",
        "blocks.5.hook_resid_post",
    ]
    assert equivalent_hooks("blocks.11.hook_resid_post", n_layers=12) == ["blocks.11.hook_resid_post"]
    assert equivalent_hooks("blocks.0.hook_resid_pre") == ["blocks.0.hook_resid_pre"]
    assert equivalent_hooks("blocks.2.hook_mlp_out") == ["blocks.2.hook_mlp_out"]


def test_twin_hooks_hold_the_same_tensor(tiny_model: LoadedModel) -> None:
    tokens = torch.randint(0, tiny_model.model.cfg.d_vocab, (2, 8))
    _, cache = tiny_model.model.run_with_cache(tokens)
    # One tensor seen by two hooks, not two computations.
    assert torch.equal(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])


# --- the params type -----------------------------------------------------------------------------


def test_source_needs_exactly_one_kind() -> None:
    with pytest.raises(ValidationError, match=r"exactly one of `name` \(shipped with runner\), `release`"):
        SAESource()
    with pytest.raises(ValidationError, match="got release, path"):
        SAESource(release="gpt2-small-res-jb", path="saes/x")


def test_id_goes_only_with_a_release() -> None:
    with pytest.raises(ValidationError, match="`id` selects an SAE inside a `release`"):
        SAESource(path="saes/x", id="blocks.0.hook_resid_pre")


def test_unknown_release_suggests_close_names() -> None:
    with pytest.raises(
        ValidationError,
        match=r"unknown SAELens release 'gpt2-small-res-j'\. Did you mean 'gpt2-small-res-jb'",
    ):
        SAESource(release="gpt2-small-res-j")


def test_source_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="extra"):
        SAESource(path="x", layer=3)  # type: ignore[call-arg]


# --- local directories -----------------------------------------------------------------------------


def test_directory_sae_takes_its_hook_from_metadata(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_sae(tmp_path / "sae", "blocks.1.hook_resid_pre")
    [loaded] = load(context(tiny_model, tmp_path), path="sae")
    assert (loaded.layer, loaded.site, loaded.hook_name, loaded.sae_hook) == (
        1,
        "resid_pre",
        *["blocks.1.hook_resid_pre"] * 2,
    )
    assert loaded.info["d_sae"] == 16 and loaded.info["architecture"] == "standard"


def test_relative_path_is_read_from_the_spec_directory(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_sae(tmp_path / "specs" / "sae", "blocks.0.hook_resid_post")
    assert load(context(tiny_model, tmp_path / "specs"), path="sae")[0].layer == 0


def test_resid_post_request_is_served_by_next_layer_resid_pre_sae(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    save_sae(tmp_path / "sae", "blocks.1.hook_resid_pre")
    ctx = context(tiny_model, tmp_path)
    [loaded] = load(ctx, layers=(0,), site="resid_post", path="sae")
    assert (loaded.layer, loaded.hook_name, loaded.sae_hook) == (
        0,
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre",
    )
    assert any(
        "blocks.0.hook_resid_post is served by the SAE trained on blocks.1.hook_resid_pre" in n
        for n in ctx.notes
    )


def test_request_for_another_hook_is_a_clear_error(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_sae(tmp_path / "sae", "blocks.1.hook_resid_pre")
    with pytest.raises(ResourceError) as info:
        load(context(tiny_model, tmp_path), layers=(1,), site="mlp_out", path="sae")
    message = str(info.value)
    assert message.startswith("test step: the SAE from directory sae was trained on blocks.1.hook_resid_pre")
    assert "layer 1 asks for blocks.1.hook_mlp_out" in message
    assert "leave `hook` out to use the SAE's own" in message


def test_per_layer_path_template_loads_one_sae_per_layer(tiny_model: LoadedModel, tmp_path: Path) -> None:
    for layer in (0, 1):
        save_sae(tmp_path / f"sae-{layer}", f"blocks.{layer}.hook_resid_post", seed=layer)
    loaded = load(context(tiny_model, tmp_path), layers=(0, 1), path="sae-{layer}")
    assert [s.hook_name for s in loaded] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert not torch.equal(loaded[0].sae.W_dec, loaded[1].sae.W_dec)


def test_one_directory_cannot_serve_several_layers(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_sae(tmp_path / "sae", "blocks.0.hook_resid_post")
    with pytest.raises(ResourceError, match=r"names one SAE, but 2 layers are requested \(0, 1\)"):
        load(context(tiny_model, tmp_path), layers=(0, 1), path="sae")


def test_path_template_needs_layers(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="per-layer template, but no `layers` are given"):
        load(context(tiny_model, tmp_path), path="sae-{layer}")


def test_missing_directory_says_where_it_looked(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ResourceError) as info:
        load(context(tiny_model, tmp_path), path="nowhere")
    assert f"no SAE directory at {tmp_path / 'nowhere'} (`sae.path: nowhere`, relative to {tmp_path})" in str(
        info.value
    )
    assert "cfg.json and sae_weights.safetensors" in str(info.value)


def test_directory_without_weights_names_the_missing_file(tiny_model: LoadedModel, tmp_path: Path) -> None:
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "cfg.json").write_text("{}")
    with pytest.raises(ResourceError, match=r"has no sae_weights\.safetensors"):
        load(context(tiny_model, tmp_path), path="sae")


def test_malformed_cfg_reports_what_sae_lens_said(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_sae(tmp_path / "sae", "blocks.0.hook_resid_post")
    (tmp_path / "sae" / "cfg.json").write_text('{"d_in": 32}')
    with pytest.raises(
        ResourceError,
        match=r"SAELens cannot load the SAE in .*sae: TypeError: .* missing 1 required positional argument",
    ):
        load(context(tiny_model, tmp_path), path="sae")


def test_sae_without_hook_metadata_says_what_to_add(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_sae(tmp_path / "sae", None)
    with pytest.raises(ResourceError, match="has no hook name in its metadata"):
        load(context(tiny_model, tmp_path), path="sae")


def test_sae_of_another_width_is_refused(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_sae(tmp_path / "sae", "blocks.0.hook_resid_post", d_in=64)
    with pytest.raises(ResourceError, match=r"reads 64-dimensional activations .* has 32"):
        load(context(tiny_model, tmp_path), path="sae")


def test_layer_beyond_the_model_names_the_range(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_sae(tmp_path / "sae", "blocks.5.hook_resid_post")
    with pytest.raises(
        ResourceError, match=r"layer 5 does not exist in model 'tiny', which has 2 layers \(0-1\)"
    ):
        load(context(tiny_model, tmp_path), path="sae")


def test_sae_is_loaded_once_per_run(
    tiny_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_sae(tmp_path / "sae", "blocks.0.hook_resid_post")
    calls = []
    original = saes_module._load_directory
    monkeypatch.setattr(saes_module, "_load_directory", lambda *a: calls.append(a) or original(*a))
    cache: dict[Any, Any] = {}
    first, second = context(tiny_model, tmp_path), context(tiny_model, tmp_path)
    first._run_cache = second._run_cache = cache  # two cases of one run share the run cache
    assert load(first, path="sae")[0].sae is load(second, path="sae")[0].sae
    assert len(calls) == 1


# --- SAEs trained by an earlier step ---------------------------------------------------------------


def finished_cases(*hooks: str) -> dict[str, list[FinishedCase[Any]]]:
    cases: list[FinishedCase[Any]] = []
    for i, hook in enumerate(hooks):
        sae = make_sae(hook, seed=i)
        trained = TrainedSAE(sae_hook=hook, sae_cfg=sae.cfg.to_dict(), sae_weights=sae.state_dict())
        cases.append(FinishedCase(f"train[layer={i}]", "train", "train_sae", None, "tiny", trained))
    return {"train": cases}


def test_step_saes_are_matched_to_requested_layers(tiny_model: LoadedModel) -> None:
    ctx = context(tiny_model, finished=finished_cases("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"))
    [loaded] = load(ctx, layers=(1,), from_step="train")
    assert loaded.sae_hook == "blocks.1.hook_resid_post"
    # The step's weights, copied; `make_sae` with the same seed draws the same numbers again.
    assert torch.equal(loaded.sae.W_dec, make_sae("blocks.1.hook_resid_post", seed=1).W_dec)


def test_step_saes_without_layers_are_all_used(tiny_model: LoadedModel) -> None:
    ctx = context(tiny_model, finished=finished_cases("blocks.1.hook_resid_post", "blocks.0.hook_resid_post"))
    assert [s.layer for s in load(ctx, from_step="train")] == [0, 1]


def test_step_without_the_layer_lists_what_it_trained(tiny_model: LoadedModel) -> None:
    ctx = context(tiny_model, finished=finished_cases("blocks.0.hook_resid_post"))
    with pytest.raises(ResourceError) as info:
        load(ctx, layers=(1,), site="resid_post", from_step="train")
    assert "trained no SAE for blocks.1.hook_resid_post; it trained SAEs for blocks.0.hook_resid_post" in str(
        info.value
    )


def test_step_that_made_no_sae_is_named(tiny_model: LoadedModel) -> None:
    from runner.errors import RunnerError

    class Counts(StepResult):
        n: int

    cases = [FinishedCase("other", "other", "counting", None, "tiny", Counts(n=3))]
    ctx = context(tiny_model, finished={"other": cases})
    with pytest.raises(
        RunnerError,
        match=r"reads step 'other' as TrainedSAE, but that step runs analysis 'counting', whose result is "
        r"Counts(?s:.*)Point it at a step of the analysis that makes TrainedSAE",
    ):
        load(ctx, from_step="other")


def test_missing_step_says_to_list_it_first(tiny_model: LoadedModel) -> None:
    from runner.errors import RunnerError

    with pytest.raises(RunnerError, match="Step 'train' has no finished case"):
        load(context(tiny_model), from_step="train")


# --- SAELens pretrained releases -------------------------------------------------------------------


def test_release_offline_fails_fast_with_offline_alternatives(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.models import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(saes_module, "_release_cached", lambda repo_id, folder: False)
    start = time.perf_counter()
    with pytest.raises(ResourceError) as info:
        load(context(tiny_model), layers=(0,), site="resid_post", release="gpt2-small-res-jb")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert message.startswith(
        "Cannot load SAE 'blocks.1.hook_resid_pre' of SAELens release 'gpt2-small-res-jb'"
    )
    assert "jbloom/GPT2-Small-SAEs-Reformatted" in message
    assert "sae: {name: smollm2-135m/blocks.12.hook_resid_post}" in message


def test_release_resid_post_uses_next_layer_resid_pre_and_last_layer_resid_post() -> None:
    entry = known_releases()["gpt2-small-res-jb"]
    ids = [str(item["id"]) for item in entry["saes"]]
    pairs = saes_module._match(ids, tuple(range(12)), "resid_post", 12)
    assert pairs[0] == ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre")
    assert pairs[10] == ("blocks.10.hook_resid_post", "blocks.11.hook_resid_pre")
    assert pairs[11] == ("blocks.11.hook_resid_post", "blocks.11.hook_resid_post")


def test_release_without_the_hook_lists_its_ids(tiny_model: LoadedModel) -> None:
    with pytest.raises(ResourceError) as info:
        load(context(tiny_model), layers=(0,), site="mlp_out", release="gpt2-small-res-jb")
    assert "has no SAE for blocks.0.hook_mlp_out" in str(info.value)
    assert "Its SAE ids: blocks.0.hook_resid_pre, blocks.1.hook_resid_pre" in str(info.value)


def test_release_id_template_must_name_existing_ids(tiny_model: LoadedModel) -> None:
    with pytest.raises(
        ResourceError,
        match=r"has no SAE with id 'blocks\.1\.hook_resid_mid'\. Close ids: blocks\.1\.hook_resid_pre",
    ):
        load(
            context(tiny_model), layers=(1,), release="gpt2-small-res-jb", id="blocks.{layer}.hook_resid_mid"
        )


def test_hook_name_template() -> None:
    assert hook_name("mlp_post", 4) == "blocks.4.mlp.hook_post"


def test_release_names_are_the_top_level_keys_of_saelens_list() -> None:
    # Scanned from the text (milliseconds) rather than built as Python objects (seconds).
    assert release_names() == frozenset(known_releases())
    assert "gpt2-small-res-jb" in release_names()


# --- SAEs runner ships -----------------------------------------------------------------------------


def test_shipped_sae_is_found_by_name_and_pinned_by_its_hashes() -> None:
    import hashlib

    assert shipped_saes() == ["smollm2-135m/blocks.12.hook_resid_post"]
    directory = saes_module.shipped_sae_dir("smollm2-135m/blocks.12.hook_resid_post")
    assert (directory / "cfg.json").is_file() and (directory / "README.md").is_file()
    expected = hashlib.sha256((directory / "sae_weights.safetensors").read_bytes()).hexdigest()
    assert saes_module._hashes(directory)["sae_weights.safetensors"] == expected


def test_unknown_shipped_name_suggests_the_shipped_ones() -> None:
    with pytest.raises(ValidationError, match=r"runner ships no SAE named 'smollm2-135m/blocks\.12'\."):
        SAESource(name="smollm2-135m/blocks.12")
    with pytest.raises(
        ValidationError, match=re.escape("Did you mean 'smollm2-135m/blocks.12.hook_resid_post'")
    ):
        SAESource(name="smollm2-135m/blocks.12.hook_resid_pots")
