"""How ``feature_maximizers`` computes; ``__init__.py`` declares it.

:func:`run`: load the SAE, pick the features, the dataset's best activation per feature
(:func:`dataset_maxima` or a ``feature_analysis`` step), then per feature each method
(:func:`relaxed_search`, :func:`discrete_search`), each result scored on its real tokens by
:func:`score_sequence`; ``outputs`` builds the files and the result.

The searches push the feature's pre-activation (``process_sae_in(x) @ W_enc[:, f] + b_enc[f]``)
where it does not fire: a JumpReLU or TopK activation is flat at 0 there and has no gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from analyses._features_csv import read_features_csv
from analyses._features_saes import load_feature_saes
from analyses._lean_forward import LeanForward, checked_lean_forward
from analyses._sae_tensors import PADDING, capture, logits_from_resid, stop_layer
from analyses.feature_analysis.compute import eligible_mask
from analyses.feature_maximizers import FeatureMaximizersParams, Maximizer, Method
from runner.errors import ResourceError
from runner.saes.loading import LoadedSAE
from runner.step import StepContext, StepOutput

__all__ = ["Search", "dataset_maxima", "discrete_search", "relaxed_search", "run", "score_sequence"]

CHUNK = 64
"""Sequences per scoring forward pass."""


@dataclass
class Search:
    """What every search of a case shares: the model, the SAE, the tokens allowed, BOS."""

    model: Any
    loaded: LoadedSAE
    allowed: torch.Tensor
    """``(d_vocab,)`` bool: tokens a sequence may hold (not special, known to the tokenizer)."""
    bos: int | None
    pool: torch.Tensor
    """``(N,)`` the dataset's allowed tokens: random starts are drawn from them."""
    lean: LeanForward | None = None
    """Runs the blocks when no gradient is needed (checked against TransformerLens' forward)."""

    @property
    def stop(self) -> int:
        """``stop_at_layer`` reaching the SAE's hook."""
        return stop_layer(self.loaded.hook_name)

    def with_bos(self, body: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` tokens → ``(B, L + 1)`` with BOS first (unchanged without BOS)."""
        if self.bos is None:
            return body
        return torch.cat([torch.full((body.shape[0], 1), self.bos, dtype=body.dtype), body], dim=1)

    def forward(
        self, tokens: torch.Tensor, feature: int, embed: torch.Tensor | None = None, full: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(B, T)`` activation and pre-activation of ``feature`` at each position, and the logits
        when ``full``. ``embed`` ``(B, T, d_model)`` replaces the token embeddings (gradients flow)."""
        kept: dict[str, torch.Tensor] = {}
        if embed is None and self.lean is not None and not torch.is_grad_enabled():
            logits = self._lean_forward(tokens, kept, full)
        else:
            logits = self._tl_forward(tokens, kept, embed, full)
        x = kept["x"]  # (B, T, d_in)
        if self.loaded.center_input:
            x = x - x.mean(dim=-1, keepdim=True)
        sae = self.loaded.sae
        bias = sae.b_enc if hasattr(sae, "b_enc") else sae.b_gate
        pre = sae.process_sae_in(x.to(sae.dtype)) @ sae.W_enc[:, feature] + bias[feature]  # (B, T)
        acts = self.loaded.encode(x)[..., feature]  # (B, T)
        return acts.float(), pre.float(), logits if full else None

    def _tl_forward(
        self, tokens: torch.Tensor, kept: dict[str, torch.Tensor], embed: torch.Tensor | None, full: bool
    ) -> torch.Tensor:
        def keep(act: torch.Tensor, hook: Any) -> None:
            kept["x"] = act

        hooks: list[tuple[str, Any]] = [(self.loaded.hook_name, keep)]
        if embed is not None:
            hooks.insert(0, ("hook_embed", lambda act, hook: embed))
        out: torch.Tensor = self.model.run_with_hooks(
            tokens, stop_at_layer=None if full else self.stop, padding_side=PADDING, fwd_hooks=hooks
        )
        return out

    def _lean_forward(self, tokens: torch.Tensor, kept: dict[str, torch.Tensor], full: bool) -> torch.Tensor:
        def keep(act: torch.Tensor) -> torch.Tensor:
            kept["x"] = act
            return act

        assert self.lean is not None
        resid = self.model.input_to_embed(tokens, padding_side=PADDING)[0]  # (B, T, d_model)
        stop = self.model.cfg.n_layers if full else self.stop
        resid = self.lean.run(resid, 0, stop, edits={self.loaded.hook_name: keep})
        return logits_from_resid(self.model, resid) if full else resid

    def score(self, tokens: torch.Tensor, feature: int, fluency: float) -> torch.Tensor:
        """``(B,)`` the search objective at the last position, no gradient: the activation where the
        feature fires, else its pre-activation capped at 0; minus ``fluency`` times the cross-entropy."""
        out = []
        with torch.no_grad():
            for start in range(0, tokens.shape[0], CHUNK):
                chunk = tokens[start : start + CHUNK]
                acts, pre, logits = self.forward(chunk, feature, full=fluency > 0)
                value = torch.where(acts[:, -1] > 0, acts[:, -1], pre[:, -1].clamp(max=0.0))
                if logits is not None:
                    value = value - fluency * cross_entropy(logits, chunk)
                out.append(value)
        return torch.cat(out)


def cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean next-token cross-entropy (nats) of each sequence under ``logits`` ``(B, T, V)``."""
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).mean(-1)


def run(ctx: StepContext, params: FeatureMaximizersParams) -> StepOutput:
    """Each feature's maximizers by each method, scored on real tokens, against the dataset's best."""
    from analyses.feature_maximizers.outputs import build_output

    started = time.perf_counter()
    where = f"feature_maximizers case {ctx.case_id}"
    loaded = _one_sae(ctx, params, where)
    labels = read_features_csv(ctx, params.features_csv, where).get(loaded.layer, {})
    features = _features(params, labels, loaded, where)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    best, source = _dataset_best(ctx, params, loaded, features, where)
    timing["dataset_max"] = time.perf_counter() - start
    search = _search(ctx, loaded, where)
    found: list[Maximizer] = []
    steps = [(f, m) for f in features for m in params.methods]
    for feature, method in ctx.progress(steps, len(steps), "feature x method"):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(ctx.seed * 100_003 + feature)
        if method == "embedding":
            body, relaxed = relaxed_search(search, feature, params, generator)
        else:
            body, relaxed = discrete_search(search, feature, params, generator), None
        seconds = time.perf_counter() - start
        timing[method] = timing.get(method, 0.0) + seconds
        found.append(
            _maximizer(ctx, search, feature, labels.get(feature, ""), method, body, relaxed, best, seconds)
        )
    return build_output(ctx, params, loaded, found, source, timing, started)


def _one_sae(ctx: StepContext, params: FeatureMaximizersParams, where: str) -> LoadedSAE:
    layers = None if params.layer is None else (params.layer,)
    saes = load_feature_saes(ctx, params.sae, layers=layers, site=params.hook, where=where)
    if len(saes) != 1:
        raise ResourceError(
            f"{where}: the SAE source covers layers {[s.layer for s in saes]}; maximizers take one.\n"
            "Set `layer`."
        )
    if len(ctx.dataset) == 0:
        raise ResourceError(f"{where}: the dataset has no passages.\nRaise `dataset.max_passages`.")
    return saes[0]


def _features(
    params: FeatureMaximizersParams, labels: dict[int, str], loaded: LoadedSAE, where: str
) -> list[int]:
    chosen = list(params.features or [])
    chosen += [f for f in labels if f not in set(chosen)]
    if not chosen:
        raise ResourceError(
            f"{where}: `features_csv: {params.features_csv}` has no row at layer {loaded.layer}.\n"
            f"Add rows for layer {loaded.layer} or list `features`."
        )
    bad = sorted(f for f in chosen if f >= loaded.d_sae)
    if bad:
        raise ResourceError(
            f"{where}: features {bad[:10]} do not exist in the SAE for layer {loaded.layer}, which has "
            f"{loaded.d_sae} features (0-{loaded.d_sae - 1}).\nChoose features below {loaded.d_sae}."
        )
    return chosen


def _search(ctx: StepContext, loaded: LoadedSAE, where: str) -> Search:
    model = ctx.model.model
    tokenizer = ctx.model.tokenizer
    vocab = int(model.cfg.d_vocab)
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[: min(vocab, len(tokenizer))] = True
    special = [i for i in (getattr(tokenizer, "all_special_ids", None) or []) if 0 <= i < vocab]
    allowed[special] = False
    bos_id = getattr(tokenizer, "bos_token_id", None)
    tokens = ctx.dataset.tokens
    bos = int(bos_id) if bos_id is not None and bool((tokens[:, 0] == bos_id).all()) else None
    pool = tokens.flatten()
    pool = pool[(pool < vocab) & allowed[pool.clamp(max=vocab - 1)]]
    if pool.numel() == 0:
        raise ResourceError(f"{where}: the dataset holds no ordinary token to start a search from.")
    lean = checked_lean_forward(ctx, model, "Scoring ran TransformerLens' blocks")
    return Search(model, loaded, allowed, bos, pool, lean)


def _dataset_best(
    ctx: StepContext, params: FeatureMaximizersParams, loaded: LoadedSAE, features: list[int], where: str
) -> tuple[dict[int, float], str]:
    if params.from_step is None:
        maxima = dataset_maxima(ctx, loaded, features, params.batch_size)
        return dict(zip(features, maxima.tolist(), strict=True)), "dataset"
    from analyses.feature_analysis import FeatureAnalysisResult

    cases = ctx.outputs(params.from_step, FeatureAnalysisResult)
    layer = cases[0].result.layers.get(loaded.layer)
    if layer is None:
        raise ResourceError(
            f"{where}: step `{params.from_step}` analysed layers {sorted(cases[0].result.layers)}, "
            f"not layer {loaded.layer}.\nPoint `from_step` at a feature_analysis step over the same SAE."
        )
    ids = [int(i) for i in layer.feature_ids]
    missing = [f for f in features if f not in set(ids)]
    if missing:
        raise ResourceError(
            f"{where}: step `{params.from_step}` did not analyse features {missing[:10]}.\n"
            "Add them to its `features` (or use `features: all`), or drop `from_step`."
        )
    position = {f: i for i, f in enumerate(ids)}
    return {f: float(layer.max_activation[position[f]]) for f in features}, f"step {params.from_step}"


def dataset_maxima(ctx: StepContext, loaded: LoadedSAE, features: list[int], batch_size: int) -> torch.Tensor:
    """``(F,)`` each feature's largest activation over the dataset, special tokens left out."""
    model = ctx.model.model
    ids = torch.tensor(features)
    special = getattr(ctx.model.tokenizer, "all_special_ids", None) or []
    special_ids = torch.tensor(sorted(set(special)), dtype=torch.int64)
    best = torch.zeros(len(features))
    for tokens in ctx.dataset.batches(batch_size):
        kept, _ = capture(model, tokens, [loaded.hook_name], stop_at_layer=stop_layer(loaded.hook_name))
        with torch.no_grad():
            acts = loaded.encode(kept[loaded.hook_name])[..., ids].float()  # (B, T, F)
        acts = acts * eligible_mask(tokens, special_ids)[..., None]
        best = torch.maximum(best, acts.flatten(0, 1).amax(0))
    return best


def relaxed_search(
    search: Search, feature: int, params: FeatureMaximizersParams, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """The seed's method: Adam on per-position logits over the vocabulary, the input being the
    softmax-weighted mean of the embeddings; ``restarts`` run side by side. Returns the best
    restart's projection (argmax tokens, ``(L,)``) and what its relaxed input reached."""
    w_e = search.model.W_E.detach()  # (V, d_model)
    shape = (params.restarts, params.seq_len, w_e.shape[0])
    logits = (0.01 * torch.randn(shape, generator=generator)).requires_grad_()
    mask = torch.where(search.allowed, 0.0, float("-inf"))  # (V,)
    optimizer = torch.optim.Adam([logits], lr=params.learning_rate)
    placeholder = search.with_bos(torch.zeros(shape[:2], dtype=torch.long))  # (R, T)

    def embeddings() -> torch.Tensor:
        probs = ((logits + mask) / params.temperature).softmax(-1)  # (R, L, V)
        embed = probs @ w_e  # (R, L, d_model)
        if search.bos is not None:
            embed = torch.cat([w_e[search.bos].expand(shape[0], 1, -1), embed], dim=1)
        return embed

    for _ in range(params.n_steps):
        optimizer.zero_grad()
        _, pre, _ = search.forward(placeholder, feature, embed=embeddings())
        (logits.grad,) = torch.autograd.grad(-pre[:, -1].sum(), logits)  # no weight gradients
        optimizer.step()
    with torch.no_grad():
        acts, _, _ = search.forward(placeholder, feature, embed=embeddings())
        body = (logits + mask).argmax(-1)  # (R, L)
        scores = search.score(search.with_bos(body), feature, 0.0)
    best = int(scores.argmax())
    return body[best], float(acts[best, -1])


def discrete_search(
    search: Search, feature: int, params: FeatureMaximizersParams, generator: torch.Generator
) -> torch.Tensor:
    """EPO / GCG-style search over real tokens; returns the best sequence found (``(L,)``, no BOS)."""
    best_body, best_score = None, float("-inf")
    for _ in range(params.restarts):
        pick = torch.randint(len(search.pool), (params.population, params.seq_len), generator=generator)
        population = search.pool[pick]  # (P, L)
        scores = search.score(search.with_bos(population), feature, params.fluency)
        for _ in range(params.iterations):
            candidates = _propose(search, feature, population, params, generator)  # (P * C, L)
            cand_scores = search.score(search.with_bos(candidates), feature, params.fluency)
            population, scores = _survivors(
                torch.cat([population, candidates]), torch.cat([scores, cand_scores]), params.population
            )
        if float(scores[0]) > best_score:
            best_body, best_score = population[0], float(scores[0])
    assert best_body is not None
    return best_body


def _propose(
    search: Search,
    feature: int,
    population: torch.Tensor,
    params: FeatureMaximizersParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """``(P * C, L)`` single-token swaps of each member, drawn among the ``top_k`` tokens per position
    whose one-hot gradient of the objective is largest (GCG's linear estimate of each swap's gain)."""
    w_e = search.model.W_E.detach()  # (V, d_model)
    tokens = search.with_bos(population)  # (P, T)
    onehot = F.one_hot(population, w_e.shape[0]).to(w_e.dtype).requires_grad_()  # (P, L, V)
    embed = onehot @ w_e  # (P, L, d_model)
    if search.bos is not None:
        embed = torch.cat([w_e[search.bos].expand(len(population), 1, -1), embed], dim=1)
    _, pre, logits = search.forward(tokens, feature, embed=embed, full=params.fluency > 0)
    objective = pre[:, -1]
    if logits is not None:
        objective = objective - params.fluency * cross_entropy(logits, tokens)
    (grad,) = torch.autograd.grad(objective.sum(), onehot)  # (P, L, V)
    grad = grad.masked_fill(~search.allowed, float("-inf"))
    top = grad.topk(min(params.top_k, int(search.allowed.sum())), dim=-1).indices  # (P, L, k)
    n_pop, length, k = top.shape
    member = torch.arange(n_pop).repeat_interleave(params.candidates)  # (P * C,)
    position = torch.randint(length, (len(member),), generator=generator)
    choice = torch.randint(k, (len(member),), generator=generator)
    candidates = population[member].clone()
    candidates[torch.arange(len(member)), position] = top[member, position, choice]
    return candidates


def _survivors(sequences: torch.Tensor, scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best distinct sequences, best first."""
    order = scores.argsort(descending=True)
    chosen: list[int] = []
    seen: set[tuple[int, ...]] = set()
    for i in order.tolist():
        key = tuple(sequences[i].tolist())
        if key not in seen:
            seen.add(key)
            chosen.append(i)
            if len(chosen) == keep:
                break
    index = torch.tensor(chosen)
    return sequences[index], scores[index]


def score_sequence(search: Search, feature: int, body: torch.Tensor) -> tuple[list[int], list[float], float]:
    """The sequence's tokens (BOS included), the feature's activation at each (0 at BOS) and its
    cross-entropy under the full model (nats)."""
    tokens = search.with_bos(body[None])  # (1, T)
    with torch.no_grad():
        acts, _, logits = search.forward(tokens, feature, full=True)
    values = acts[0].clone()
    if search.bos is not None:
        values[0] = 0.0
    assert logits is not None
    ce = float(cross_entropy(logits, tokens)[0]) if tokens.shape[1] > 1 else float("nan")
    return tokens[0].tolist(), values.tolist(), ce


def _maximizer(
    ctx: StepContext,
    search: Search,
    feature: int,
    label: str,
    method: Method,
    body: torch.Tensor,
    relaxed: float | None,
    best: dict[int, float],
    seconds: float,
) -> Maximizer:
    ids, values, ce = score_sequence(search, feature, body)
    activation = max(values)
    dataset_max = best[feature]
    return Maximizer(
        feature=feature,
        label=label,
        method=method,
        tokens=ctx.model.tokenizer.batch_decode([[i] for i in ids]),
        token_ids=ids,
        values=values,
        activation=activation,
        cross_entropy=ce,
        relaxed_activation=relaxed,
        dataset_max=dataset_max,
        ratio=activation / dataset_max if dataset_max > 0 else None,
        beats_dataset=activation >= dataset_max,
        seconds=seconds,
    )
