"""How ``feature_maximizers`` computes; ``__init__.py`` declares it.

:func:`run`: load the SAE, pick the features, the dataset's best activation per feature
(:func:`dataset_maxima` or a ``feature_analysis`` step), then per feature each method
(:func:`relaxed_search`, :func:`discrete_search`, the latter from :func:`dataset_windows` or random
tokens), each result scored on its real tokens by :func:`score_sequence`; ``outputs`` builds the files
and the result.

The searches push the feature's pre-activation (``process_sae_in(x) @ W_enc[:, f] + b_enc[f]``)
where it does not fire: a JumpReLU or TopK activation is flat at 0 there and has no gradient. Forward
passes, with and without gradients, run the checked lean forward (``analyses/_lean_forward.py``) when
the model allows it, TransformerLens' own otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

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

__all__ = [
    "Best",
    "Found",
    "Search",
    "dataset_top",
    "dataset_windows",
    "discrete_search",
    "objective",
    "relaxed_search",
    "run",
    "score_sequence",
]

CHUNK = 64
"""Sequences per scoring forward pass."""
SWAP_GROUPS = 4
"""Groups of swapped sequences scored together from cached prefixes (by where their swap is): each
group runs from its first swapped position. More groups skip more positions but run more, smaller
passes (on 2 cores, one group per position was slower than four)."""


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
    """Runs the blocks (checked against TransformerLens' forward; autograd-safe)."""

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
        if self.lean is not None:
            logits = self._lean_forward(tokens, kept, embed, full)
        else:
            logits = self._tl_forward(tokens, kept, embed, full)
        acts, pre = self.encode(kept["x"], feature)
        return acts, pre, logits if full else None

    def encode(self, x: torch.Tensor, feature: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` activation and pre-activation of ``feature`` from the hook's ``(B, T, d_in)``."""
        if self.loaded.center_input:
            x = x - x.mean(dim=-1, keepdim=True)
        sae = self.loaded.sae
        bias = sae.b_enc if hasattr(sae, "b_enc") else sae.b_gate
        pre = sae.process_sae_in(x.to(sae.dtype)) @ sae.W_enc[:, feature] + bias[feature]  # (B, T)
        acts = self.loaded.encode(x)[..., feature]  # (B, T)
        return acts.float(), pre.float()

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

    def _lean_forward(
        self, tokens: torch.Tensor, kept: dict[str, torch.Tensor], embed: torch.Tensor | None, full: bool
    ) -> torch.Tensor:
        def keep(act: torch.Tensor) -> torch.Tensor:
            kept["x"] = act
            return act

        assert self.lean is not None
        if embed is None:
            resid = self.model.input_to_embed(tokens, padding_side=PADDING)[0]  # (B, T, d_model)
        else:  # TransformerLens adds what follows the embedding (positions, scaling) as in its forward
            with self.model.hooks(fwd_hooks=[("hook_embed", lambda act, hook: embed)]):
                resid = self.model.input_to_embed(tokens, padding_side=PADDING)[0]
        stop = self.model.cfg.n_layers if full else self.stop
        resid = self.lean.run(resid, 0, stop, edits={self.loaded.hook_name: keep})
        return logits_from_resid(self.model, resid) if full else resid

    def score(self, tokens: torch.Tensor, feature: int, fluency: float) -> torch.Tensor:
        """``(B,)`` the discrete search's :func:`objective` minus ``fluency`` times the cross-entropy,
        without gradients."""
        out = []
        with torch.no_grad():
            for start in range(0, tokens.shape[0], CHUNK):
                chunk = tokens[start : start + CHUNK]
                acts, pre, logits = self.forward(chunk, feature, full=fluency > 0)
                value = objective(acts, pre, self.bos is not None)
                if logits is not None:
                    value = value - fluency * cross_entropy(logits, chunk)
                out.append(value)
        return torch.cat(out)

    def score_swaps(self, parents: torch.Tensor, swapped: Swaps, feature: int) -> torch.Tensor:
        """``(N,)`` :func:`objective` of single-token swaps of ``parents`` ``(P, L)``, without gradients,
        running only the positions from each swap on: the positions before it are the parent's, so
        their keys and values come from one pass over the parents (causal attention), and so do their
        activations. Equal to :meth:`score` with ``fluency: 0`` up to float32 rounding (the matmuls'
        shapes differ); needs the lean forward."""
        assert self.lean is not None
        hook, first = self.loaded.hook_name, int(self.bos is not None)
        kept: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor) -> torch.Tensor:
            kept["x"] = act
            return act

        out = torch.empty(len(swapped.candidates))
        with torch.no_grad():
            kv: list[tuple[torch.Tensor, torch.Tensor]] = []
            resid = self.model.input_to_embed(self.with_bos(parents), padding_side=PADDING)[0]  # (P, T, d)
            self.lean.run(resid, 0, self.stop, edits={hook: keep}, keep_kv=kv)
            acts, pre = self.encode(kept["x"], feature)
            values = torch.where(acts > 0, acts, pre.clamp(max=0.0))  # (P, T)
            tokens = self.with_bos(swapped.candidates)
            embed = self.model.input_to_embed(tokens, padding_side=PADDING)[0]  # (N, T, d_model)
            # a few groups, each run from its first changed position: fewer, larger passes
            length = swapped.candidates.shape[1]
            bounds = sorted({first + (length * i) // SWAP_GROUPS for i in range(SWAP_GROUPS)})
            start = torch.tensor(bounds)[
                torch.bucketize(swapped.position + first, torch.tensor(bounds), right=True) - 1
            ]
            for s in start.unique().tolist():
                rows = (start == s).nonzero().squeeze(1)
                parent = swapped.member[rows]
                prefix = [(k[parent, :s], v[parent, :s]) for k, v in kv] if s > 0 else None
                self.lean.run(embed[rows, s:], 0, self.stop, prefix, edits={hook: keep})
                acts, pre = self.encode(kept["x"], feature)  # (b, T - s)
                after = torch.where(acts > 0, acts, pre.clamp(max=0.0))
                out[rows] = torch.cat([values[parent, first:s], after], dim=1).amax(dim=1)
        return out


def objective(acts: torch.Tensor, pre: torch.Tensor, bos: bool) -> torch.Tensor:
    """``(B,)`` the feature's largest activation over positions (after BOS when ``bos``) of ``(B, T)``
    activations; where it fires nowhere, its largest pre-activation capped at 0 (below 0: how far off).
    Differentiable at the winning position (through the activation where the feature fires)."""
    value = torch.where(acts > 0, acts, pre.clamp(max=0.0))  # (B, T)
    if bos:
        value = value[:, 1:]
    return value.amax(dim=-1)


def cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean next-token cross-entropy (nats) of each sequence under ``logits`` ``(B, T, V)``."""
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).mean(-1)


@dataclass
class Best:
    """The dataset's best per feature: its largest activation and where its top activations are."""

    maxima: dict[int, float]
    top: dict[int, list[int]]
    """Feature → global token indices (``passage * max_len + position``) of its top activations,
    largest first (empty when it never fires)."""
    source: str
    """`step <id>` or `dataset`."""


@dataclass
class Swaps:
    """Single-token swaps of a population's members."""

    candidates: torch.Tensor
    """``(N, L)`` each a member with one token swapped."""
    member: torch.Tensor
    """``(N,)`` the member (row of the population) each comes from."""
    position: torch.Tensor
    """``(N,)`` the position swapped (in the sequence without BOS)."""


@dataclass
class Found:
    """A discrete search's winner and where it came from."""

    body: torch.Tensor
    """``(L,)`` the best sequence, without BOS."""
    init: Literal["dataset", "random"]
    start: torch.Tensor
    """``(L,)`` the starting sequence it descends from."""
    trace: list[float]
    """Its restart's best objective at the start and after each round."""


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
    best = _dataset_best(ctx, params, loaded, features, where)
    timing["dataset_max"] = time.perf_counter() - start
    search = _search(ctx, loaded, where)
    found: list[Maximizer] = []
    steps = [(f, m) for f in features for m in params.methods]
    for feature, method in ctx.progress(steps, len(steps), "feature x method"):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(ctx.seed * 100_003 + feature)
        if method == "embedding":
            body, relaxed = relaxed_search(search, feature, params, generator)
            winner = Found(body, "random", body, [])
        else:
            windows = dataset_windows(
                search, ctx.dataset.tokens, best.top[feature], params.seq_len, generator
            )
            winner, relaxed = discrete_search(search, feature, params, generator, windows), None
        seconds = time.perf_counter() - start
        timing[method] = timing.get(method, 0.0) + seconds
        label = labels.get(feature, "")
        found.append(_maximizer(ctx, search, feature, label, method, winner, relaxed, best, seconds))
    return build_output(ctx, params, loaded, found, best.source, timing, started)


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
) -> Best:
    k = max(_dataset_starts(params), 1)
    if params.from_step is None:
        values, tokens = dataset_top(ctx, loaded, features, params.batch_size, k)
        return Best(
            {f: float(values[i, 0]) for i, f in enumerate(features)},
            {f: [int(t) for t in tokens[i] if t >= 0] for i, f in enumerate(features)},
            "dataset",
        )
    from analyses.feature_analysis import FeatureAnalysisResult

    cases = ctx.outputs(params.from_step, FeatureAnalysisResult)
    matching = [c for c in cases if c.result.dataset == ctx.dataset.fingerprint]
    if not matching:
        raise ResourceError(
            f"{where}: step `{params.from_step}` analysed another dataset than this case's "
            f"({ctx.dataset.name}, fingerprint {ctx.dataset.fingerprint[:12]}).\n"
            "Run both steps on the same dataset, or drop `from_step`."
        )
    layer = matching[0].result.layers.get(loaded.layer)
    if layer is None:
        raise ResourceError(
            f"{where}: step `{params.from_step}` analysed layers {sorted(matching[0].result.layers)}, "
            f"not layer {loaded.layer}.\nPoint `from_step` at a feature_analysis step over the same SAE."
        )
    ids = [int(i) for i in layer.feature_ids]
    missing = [f for f in features if f not in set(ids)]
    if missing:
        raise ResourceError(
            f"{where}: step `{params.from_step}` did not analyse features {missing[:10]}.\n"
            "Add them to its `features` (or use `features: all`), or drop `from_step`."
        )
    row = {f: i for i, f in enumerate(ids)}
    return Best(
        {f: float(layer.max_activation[row[f]]) for f in features},
        {f: [int(t) for t in layer.top_tokens[row[f]] if t >= 0] for f in features},
        f"step {params.from_step}",
    )


def _dataset_starts(params: FeatureMaximizersParams) -> int:
    """Dataset windows the discrete search's restarts start from."""
    restarts = {"dataset": params.restarts, "random": 0, "mixed": (params.restarts + 1) // 2}[params.init]
    return params.population * restarts


def dataset_top(
    ctx: StepContext, loaded: LoadedSAE, features: list[int], batch_size: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, k)`` each feature's ``k`` largest activations over the dataset, special tokens left out,
    largest first, and their global token indices (``passage * max_len + position``; -1 where the
    feature fired at fewer than ``k`` positions, whose values are 0)."""
    model = ctx.model.model
    ids = torch.tensor(features)
    special = getattr(ctx.model.tokenizer, "all_special_ids", None) or []
    special_ids = torch.tensor(sorted(set(special)), dtype=torch.int64)
    values = torch.zeros(len(features), k)
    where = torch.full((len(features), k), -1, dtype=torch.int64)
    first = 0
    for tokens in ctx.dataset.batches(batch_size):
        kept, _ = capture(model, tokens, [loaded.hook_name], stop_at_layer=stop_layer(loaded.hook_name))
        with torch.no_grad():
            acts = loaded.encode(kept[loaded.hook_name])[..., ids].float()  # (B, T, F)
        acts = (acts * eligible_mask(tokens, special_ids)[..., None]).flatten(0, 1).T  # (F, B T)
        index = torch.arange(acts.shape[1]).expand_as(acts) + first
        both = torch.cat([values, acts], dim=1)  # (F, k + B T): kept ones first, so ties keep them
        pick = torch.sort(both, dim=1, descending=True, stable=True).indices[:, :k]
        values, where = both.gather(1, pick), torch.cat([where, index], dim=1).gather(1, pick)
        first += tokens.numel()
    return values, where.masked_fill(values <= 0, -1)


def dataset_windows(
    search: Search, tokens: torch.Tensor, top: list[int], seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """``(K, seq_len)`` the tokens ending at each global index of ``top`` in ``tokens`` ``(N, T)``,
    after BOS when there is one; positions before the passage's start (or its BOS), and tokens a
    search may not use, are drawn at random from the dataset's tokens."""
    length = tokens.shape[1]
    first = 0 if search.bos is None else 1
    rows = []
    for index in top:
        passage, position = divmod(index, length)
        window = tokens[passage, max(first, position - seq_len + 1) : position + 1]
        fill = search.pool[torch.randint(len(search.pool), (seq_len - len(window),), generator=generator)]
        rows.append(torch.cat([fill, window]))
    if not rows:
        return torch.zeros((0, seq_len), dtype=torch.long)
    body = torch.stack(rows)  # (K, L)
    vocab = len(search.allowed)
    bad = (body >= vocab) | ~search.allowed[body.clamp(max=vocab - 1)]
    body[bad] = search.pool[torch.randint(len(search.pool), (int(bad.sum()),), generator=generator)]
    return body


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
    search: Search,
    feature: int,
    params: FeatureMaximizersParams,
    generator: torch.Generator,
    windows: torch.Tensor,
) -> Found:
    """EPO / GCG-style search over real tokens from ``params.init`` starts (``windows`` ``(K, L)``: the
    dataset's, best first); returns the best sequence found across restarts and its lineage."""
    winner: Found | None = None
    used = 0
    for restart in range(params.restarts):
        from_data = params.init == "dataset" or (params.init == "mixed" and restart % 2 == 0)
        taken = windows[used : used + params.population] if from_data else windows[:0]
        used += len(taken)
        pick = torch.randint(
            len(search.pool), (params.population - len(taken), params.seq_len), generator=generator
        )
        starts = torch.cat([taken, search.pool[pick]])  # (P, L)
        population, scores, keep = _survivors(
            starts, search.score(search.with_bos(starts), feature, params.fluency), params.population
        )
        lineage = keep  # each member's start, by row of ``starts``
        trace = [float(scores[0])]
        for _ in range(params.iterations):
            swaps = _propose(search, feature, population, params, generator)
            if params.fluency == 0 and search.lean is not None:
                cand_scores = search.score_swaps(population, swaps, feature)
            else:
                cand_scores = search.score(search.with_bos(swaps.candidates), feature, params.fluency)
            population, scores, keep = _survivors(
                torch.cat([population, swaps.candidates]), torch.cat([scores, cand_scores]), params.population
            )
            lineage = torch.cat([lineage, lineage[swaps.member]])[keep]
            trace.append(float(scores[0]))
        if winner is None or trace[-1] > winner.trace[-1]:
            origin = int(lineage[0])
            init: Literal["dataset", "random"] = "dataset" if origin < len(taken) else "random"
            winner = Found(population[0], init, starts[origin], trace)
    assert winner is not None
    return winner


def _propose(
    search: Search,
    feature: int,
    population: torch.Tensor,
    params: FeatureMaximizersParams,
    generator: torch.Generator,
) -> Swaps:
    """``P * C`` single-token swaps, ``C`` of each member, drawn among the ``top_k`` tokens per
    position whose one-hot gradient of the objective is largest (GCG's linear estimate of each swap's
    gain)."""
    w_e = search.model.W_E.detach()  # (V, d_model)
    tokens = search.with_bos(population)  # (P, T)
    onehot = F.one_hot(population, w_e.shape[0]).to(w_e.dtype).requires_grad_()  # (P, L, V)
    embed = onehot @ w_e  # (P, L, d_model)
    if search.bos is not None:
        embed = torch.cat([w_e[search.bos].expand(len(population), 1, -1), embed], dim=1)
    acts, pre, logits = search.forward(tokens, feature, embed=embed, full=params.fluency > 0)
    value = objective(acts, pre, search.bos is not None)
    if logits is not None:
        value = value - params.fluency * cross_entropy(logits, tokens)
    (grad,) = torch.autograd.grad(value.sum(), onehot)  # (P, L, V)
    grad = grad.masked_fill(~search.allowed, float("-inf"))
    top = grad.topk(min(params.top_k, int(search.allowed.sum())), dim=-1).indices  # (P, L, k)
    n_pop, length, k = top.shape
    member = torch.arange(n_pop).repeat_interleave(params.candidates)  # (P * C,)
    position = torch.randint(length, (len(member),), generator=generator)
    choice = torch.randint(k, (len(member),), generator=generator)
    candidates = population[member].clone()
    candidates[torch.arange(len(member)), position] = top[member, position, choice]
    return Swaps(candidates, member, position)


def _survivors(
    sequences: torch.Tensor, scores: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``keep`` best distinct sequences, best first (ties: the earlier row), their scores and rows."""
    order = torch.sort(scores, descending=True, stable=True).indices
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
    return sequences[index], scores[index], index


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
    winner: Found,
    relaxed: float | None,
    best: Best,
    seconds: float,
) -> Maximizer:
    ids, values, ce = score_sequence(search, feature, winner.body)
    activation = max(values)
    dataset_max = best.maxima[feature]
    start: dict[str, Any] = {"start_token_ids": None, "start_activation": None, "swaps": None, "trace": None}
    if method == "discrete":
        start_ids, start_values, _ = score_sequence(search, feature, winner.start)
        start = {
            "start_token_ids": start_ids,
            "start_activation": max(start_values),
            "swaps": int((winner.body != winner.start).sum()),
            "trace": [round(v, 4) for v in winner.trace],
        }
    return Maximizer(
        feature=feature,
        label=label,
        method=method,
        init=winner.init,
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
        **start,
    )
