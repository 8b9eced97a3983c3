"""Streaming per-feature statistics of SAE activations, for every feature at once (``feature_analysis``).

One :class:`FeatureAccumulator` per SAE takes the feature activations of each batch of passages
``(B, T, F)`` and keeps, per feature, without a loop over features and without storing activations:

- counts, sums and sums of squares of the activations (density, means, standard deviation) and the
  maximum;
- a histogram of the non-zero activations in ``FINE_BINS`` equal bins over ``[0, hi)``, where ``hi`` is
  the smallest power of two above the feature's maximum so far. When a larger activation arrives
  ``hi`` doubles (as often as needed) and adjacent bins merge in pairs, so the counts stay exact: a
  value's bin is ``floor(v * FINE_BINS / hi)``, and ``floor(floor(x) / 2) == floor(x / 2)``;
- the ``top_k`` largest activations with their token and the feature's activations in a window
  around it (``buffer`` tokens before and after: the contexts a dashboard shows);
- interval samples: ``samples`` activations drawn uniformly at random, without replacement, from
  each of ``GROUPS`` equal-width groups of fine bins, each with its window. Each (token, feature) gets
  a pseudo-random key (:func:`sample_keys`); a group keeps the ``samples`` entries of smallest key
  seen so far. The smallest keys of a union are the smallest of the parts' smallest, so groups merge
  exactly when ``hi`` doubles, and an interval made of whole groups gets an exact uniform sample.

:meth:`FeatureAccumulator.finish` turns that into :class:`FeatureTable` (numpy, one row per feature):
the 50-bin histogram and the 10 equal-width sample intervals of SAEDashboard span ``[0, R]``, where
``R`` is the smallest multiple of ``hi / 10`` above the maximum (at most 1.2 times the maximum), so
that each bin and interval is a union of whole fine bins and groups. Quantiles of the non-zero
activations are read from the fine histogram, interpolated within a bin (error below ``hi / 500``,
0.4% of the maximum at most).

Also here: each feature's decoder direction through the unembedding (``logit_effects``), and the
Neuronpedia feature record (``neuronpedia_record``), the schema SAEDashboard exports for
Neuronpedia.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "FINE_BINS",
    "GROUPS",
    "FeatureAccumulator",
    "FeatureTable",
    "LogitEffects",
    "logit_effects",
    "neuronpedia_record",
    "sample_keys",
]

FINE_BINS = 500
"""Histogram bins per feature over ``[0, hi)`` while accumulating."""
GROUPS = 100
"""Interval-sample groups per feature (``FINE_BINS / GROUPS`` = 5 fine bins each)."""
HIST_BINS = 50
"""Bins of the reported histogram (SAEDashboard's and Neuronpedia's)."""
INTERVALS = 10
"""Equal-width activation intervals sampled (SAEDashboard's)."""
_PER_GROUP = FINE_BINS // GROUPS
_KEY_MASK = (1 << 62) - 1
_NO_KEY = _KEY_MASK + 1
"""Key of an empty sample slot: larger than every real key."""
_STEP = int(np.lcm(HIST_BINS, INTERVALS * _PER_GROUP))


def sample_keys(tokens: torch.Tensor, features: torch.Tensor, seed: int) -> torch.Tensor:
    """int64 pseudo-random keys in ``[0, 2**62)`` of (global token index, feature index) pairs.

    A fixed integer mix (splitmix64's constants, wrapped to 62 bits), so a sample depends on the
    seed and the data, not on batch sizes or the order features are processed in.
    """
    x = (tokens * 1_000_003 + features * 7_919 + seed * 104_729) & _KEY_MASK
    for multiplier in (0x1F58476D1CE4E5B9, 0x14D049BB133111EB):  # splitmix64 (top bits trimmed)
        x = ((x ^ (x >> 31)) * multiplier) & _KEY_MASK
    return x ^ (x >> 29)


def _power_of_two_above(values: torch.Tensor) -> torch.Tensor:
    """float64 ``2**e`` with ``2**(e-1) <= v < 2**e`` for ``v > 0`` (``frexp``); 0 where ``v <= 0``."""
    _, exponent = torch.frexp(values.double())
    return torch.where(values > 0, torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent), 0.0)


@dataclass
class FeatureAccumulator:
    """Streaming statistics of ``n_features`` features; see the module docstring.

    ``feature_ids`` are the features' indices in the SAE (they seed the sample keys), ``buffer`` the
    tokens kept before and after each example, ``samples`` the samples per interval group.
    """

    feature_ids: torch.Tensor
    top_k: int = 20
    buffer: tuple[int, int] = (5, 5)
    samples: int = 5
    seed: int = 0
    n_tokens: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f, k, s, w = len(self.feature_ids), self.top_k, self.samples, sum(self.buffer) + 1
        self.state = {
            "count": torch.zeros(f, dtype=torch.int64),
            "sum": torch.zeros(f, dtype=torch.float64),
            "sum_sq": torch.zeros(f, dtype=torch.float64),
            "max": torch.zeros(f, dtype=torch.float32),
            "hi": torch.zeros(f, dtype=torch.float64),
            "hist": torch.zeros(f, FINE_BINS, dtype=torch.int64),
            "top_values": torch.zeros(f, k, dtype=torch.float32),
            "top_tokens": torch.full((f, k), -1, dtype=torch.int64),
            "top_windows": torch.zeros(f, k, w, dtype=torch.float32),
            "keys": torch.full((f, GROUPS, s), _NO_KEY, dtype=torch.int64),
            "sample_values": torch.zeros(f, GROUPS, s, dtype=torch.float32),
            "sample_tokens": torch.full((f, GROUPS, s), -1, dtype=torch.int64),
            "sample_windows": torch.zeros(f, GROUPS, s, w, dtype=torch.float32),
        }

    @property
    def width(self) -> int:
        """Tokens in an example's window."""
        return sum(self.buffer) + 1

    def add(self, acts: torch.Tensor, eligible: torch.Tensor, first_token: int) -> None:
        """Add feature activations ``(B, T, F)`` (CPU float32; zeroed in place where not eligible) of
        passages whose first token has global index ``first_token`` (passage ``p``, position ``t`` is
        ``p * T + t``); ``eligible`` ``(B, T)`` bool marks the positions counted."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small ops on sparse entries: extra threads cost more than they give
        try:
            self._add(acts, eligible, first_token)
        finally:
            torch.set_num_threads(threads)

    def _add(self, acts: torch.Tensor, eligible: torch.Tensor, first_token: int) -> None:
        _, length, n = acts.shape
        acts.masked_fill_(~eligible.unsqueeze(-1), 0.0)
        flat = acts.view(-1, n)  # (N, F)
        rows, cols = (flat > 0).nonzero(as_tuple=True)  # (M,) token in batch, feature; row-major
        values = flat[rows, cols]
        st = self.state
        st["count"] += torch.bincount(cols, minlength=n)
        st["sum"].index_add_(0, cols, values.double())
        st["sum_sq"].index_add_(0, cols, values.double().square())
        self.n_tokens += int(eligible.sum())
        padded = torch.nn.functional.pad(acts, (0, 0, self.buffer[0], self.buffer[1]), value=float("nan"))
        windows = _Windows(padded, length, self.width)  # (B, T + W - 1, F)
        self._grow(torch.zeros(n).scatter_reduce_(0, cols, values, "amax"))
        self._add_histogram(cols, values)
        self._add_top(rows, cols, values, windows, first_token)
        if self.samples:
            self._add_samples(rows, cols, values, windows, first_token)

    def _grow(self, batch_max: torch.Tensor) -> None:
        """Raise the maxima and, where a maximum reaches ``hi``, double ``hi`` merging bins and groups."""
        st = self.state
        st["max"] = torch.maximum(st["max"], batch_max)
        new_hi = _power_of_two_above(st["max"])
        grown = (new_hi > st["hi"]).nonzero(as_tuple=True)[0]
        if grown.numel() == 0:
            return
        old = st["hi"][grown]
        shift = torch.where(old > 0, torch.log2(new_hi[grown] / torch.where(old > 0, old, 1.0)), 0.0)
        shift = shift.round().long().clamp(max=62)[:, None]  # (G, 1) doublings
        bins = torch.arange(FINE_BINS)[None, :] >> shift  # (G, FINE_BINS) each old bin's new bin
        merged = torch.zeros(len(grown), FINE_BINS, dtype=torch.int64)
        st["hist"][grown] = merged.scatter_add_(1, bins, st["hist"][grown])
        merging = (old > 0).nonzero(as_tuple=True)[0]  # features seen before: their samples regroup
        if merging.numel():
            self._merge_groups(grown[merging], shift[merging])
        st["hi"][grown] = new_hi[grown]

    def _merge_groups(self, grown: torch.Tensor, shift: torch.Tensor) -> None:
        """Old group ``g`` of each grown feature joins group ``g >> shift``; keep the smallest keys."""
        st, s = self.state, self.samples
        if not s:
            return
        groups = (torch.arange(GROUPS)[None, :] >> shift)[:, :, None].expand(-1, -1, s)  # (G, GROUPS, s)
        keys = st["keys"][grown].reshape(len(grown), -1)
        order = _segment_order(groups.reshape(len(grown), -1), keys)  # (G, GROUPS * s)
        target_group = groups.reshape(len(grown), -1).gather(1, order)
        rank = _rank_in_runs(target_group)
        keep = rank < s
        row = torch.arange(len(grown))[:, None].expand_as(order)[keep]
        slot_group, slot = target_group[keep], rank[keep]
        for name in ("keys", "sample_values", "sample_tokens", "sample_windows"):
            old = st[name][grown]
            fresh = torch.full_like(old, _NO_KEY if name == "keys" else 0)
            if name == "sample_tokens":
                fresh.fill_(-1)
            flat_old = old.reshape(len(grown), GROUPS * s, *old.shape[3:])
            picked = flat_old[torch.arange(len(grown))[:, None], order][keep]
            fresh[row, slot_group, slot] = picked
            st[name][grown] = fresh

    def _add_histogram(self, cols: torch.Tensor, values: torch.Tensor) -> None:
        hi = self.state["hi"][cols]
        bins = (values.double() * FINE_BINS / hi).floor().long().clamp_(0, FINE_BINS - 1)
        counts = torch.bincount(cols * FINE_BINS + bins, minlength=self.state["hist"].numel())
        self.state["hist"] += counts.view_as(self.state["hist"])

    def _add_top(
        self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, windows: _Windows, first: int
    ) -> None:
        """Merge the batch's ``top_k`` largest activations per feature into the kept ones (ties: the
        earlier token first)."""
        st, k = self.state, self.top_k
        order = _segment_order(cols[None], -values[None])[0]  # by feature, then largest first
        rank = _rank_in_runs(cols[order][None])[0]
        chosen = order[rank < k]
        cand_values = torch.zeros_like(st["top_values"])
        cand_tokens = torch.full_like(st["top_tokens"], -1)
        cand_values[cols[chosen], rank[rank < k]] = values[chosen]
        cand_tokens[cols[chosen], rank[rank < k]] = rows[chosen] + first
        both_values = torch.cat([st["top_values"], cand_values], dim=1)  # (F, 2k)
        both_tokens = torch.cat([st["top_tokens"], cand_tokens], dim=1)
        pick = torch.sort(both_values, dim=1, descending=True, stable=True).indices[:, :k]  # (F, k)
        fresh = (pick >= k) & (both_tokens.gather(1, pick) >= 0)  # (F, k) entries from this batch
        if not bool((pick >= k).any()):
            return
        new_windows = st["top_windows"].gather(1, pick.clamp(max=k - 1)[..., None].expand(-1, -1, self.width))
        new_tokens = both_tokens.gather(1, pick)
        feature = torch.arange(len(pick))[:, None].expand_as(pick)[fresh]
        new_windows[fresh] = windows.at(new_tokens[fresh] - first, feature)
        st["top_values"], st["top_tokens"], st["top_windows"] = (
            both_values.gather(1, pick),
            new_tokens,
            new_windows,
        )

    def _add_samples(
        self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, windows: _Windows, first: int
    ) -> None:
        """Per (feature, group): keep the ``samples`` smallest keys of the kept and the batch's entries.
        Kept entries stay in their slots; a batch entry takes the slot of one it displaces."""
        st, s = self.state, self.samples
        hi = st["hi"][cols]
        group = (values.double() * FINE_BINS / hi).floor().long().clamp_(0, FINE_BINS - 1) // _PER_GROUP
        keys = sample_keys(rows + first, self.feature_ids[cols], self.seed)
        segment = cols * GROUPS + group  # (M,)
        order = _segment_order(segment[None], keys[None])[0]
        rank = _rank_in_runs(segment[order][None])[0]
        chosen, rank = order[rank < s], rank[rank < s]  # at most s batch entries per segment
        touched, where = torch.unique(segment[chosen], return_inverse=True)  # (U,)
        candidates = torch.full((len(touched), s), _NO_KEY, dtype=torch.int64)
        candidates[where, rank] = keys[chosen]
        entry_of = torch.full((len(touched), s), -1, dtype=torch.int64)
        entry_of[where, rank] = chosen
        kept_keys = st["keys"].view(-1, s)[touched]  # (U, s)
        both = torch.cat([kept_keys, candidates], dim=1)  # (U, 2s)
        winners = torch.zeros_like(both, dtype=torch.bool)
        winners.scatter_(1, torch.sort(both, dim=1, stable=True).indices[:, :s], True)
        new = winners[:, s:] & (candidates < _NO_KEY)  # (U, s) batch entries that enter
        freed = ~winners[:, :s] | (kept_keys == _NO_KEY)  # (U, s) slots they may take
        # the i-th entering entry of a row takes the row's i-th freed slot (as many of each, or more slots)
        slot = torch.sort((~freed).to(torch.int8), dim=1, stable=True).indices  # freed slots first
        source = torch.sort((~new).to(torch.int8), dim=1, stable=True).indices  # entering entries first
        take = torch.arange(s)[None, :] < new.sum(1, keepdim=True)  # (U, s)
        row = torch.arange(len(touched))[:, None].expand(-1, s)[take]
        flat_slot = touched[row] * s + slot[take]
        entry = entry_of[row, source[take]]
        st["keys"].view(-1)[flat_slot] = keys[entry]
        st["sample_values"].view(-1)[flat_slot] = values[entry]
        st["sample_tokens"].view(-1)[flat_slot] = rows[entry] + first
        st["sample_windows"].view(-1, self.width)[flat_slot] = windows.at(rows[entry], cols[entry])

    def finish(self) -> FeatureTable:
        """The per-feature statistics as numpy arrays (see :class:`FeatureTable`)."""
        st = {name: t.numpy() for name, t in self.state.items()}
        count = st["count"]
        hist = st["hist"]
        occupied = np.where(hist.any(1), FINE_BINS - np.argmax(hist[:, ::-1] > 0, axis=1), 0)  # (F,)
        step = _STEP  # [0, R] spans whole histogram bins and whole interval groups: 50 fine bins
        n_fine = np.maximum(-(-occupied // step), 1) * step  # (F,) fine bins spanned by [0, R]
        reach = st["hi"] * n_fine / FINE_BINS
        return FeatureTable(
            feature_ids=self.feature_ids.numpy(),
            n_tokens=self.n_tokens,
            count=count,
            sum=st["sum"],
            sum_sq=st["sum_sq"],
            max=st["max"],
            hi=st["hi"],
            fine_hist=hist,
            reach=reach,
            n_fine=n_fine,
            top_values=st["top_values"],
            top_tokens=st["top_tokens"],
            top_windows=st["top_windows"],
            sample_keys=st["keys"],
            sample_values=st["sample_values"],
            sample_tokens=st["sample_tokens"],
            sample_windows=st["sample_windows"],
            buffer=self.buffer,
        )


@dataclass
class _Windows:
    """Windows of one batch's activations: ``padded`` ``(B, T + W - 1, F)``, NaN outside the passage."""

    padded: torch.Tensor
    length: int
    width: int

    def at(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``(M, W)`` activations of ``features`` ``(M,)`` around batch tokens ``tokens`` ``(M,)``."""
        passage, position = tokens // self.length, tokens % self.length
        offsets = position[:, None] + torch.arange(self.width)[None, :]  # (M, W) in padded coordinates
        return self.padded[passage[:, None], offsets, features[:, None]]


def _segment_order(segments: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per row, the order sorting entries by segment, then by key (two stable sorts)."""
    by_key = torch.sort(keys, dim=1, stable=True).indices
    by_segment = torch.sort(segments.gather(1, by_key), dim=1, stable=True).indices
    return by_key.gather(1, by_segment)


def _rank_in_runs(sorted_segments: torch.Tensor) -> torch.Tensor:
    """Per row of sorted segment ids, each entry's rank within its run of equal ids."""
    n = sorted_segments.shape[1]
    position = torch.arange(n).expand_as(sorted_segments)
    starts = torch.ones_like(sorted_segments, dtype=torch.bool)
    starts[:, 1:] = sorted_segments[:, 1:] != sorted_segments[:, :-1]
    run_start = torch.where(starts, position, 0).cummax(dim=1).values
    return position - run_start


@dataclass
class FeatureTable:
    """Finished statistics of F features (numpy; see :class:`FeatureAccumulator`)."""

    feature_ids: np.ndarray
    n_tokens: int
    count: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray
    max: np.ndarray
    hi: np.ndarray
    fine_hist: np.ndarray
    reach: np.ndarray
    """``(F,)`` ``R``: the upper edge of the reported histogram and intervals (0 for a dead feature)."""
    n_fine: np.ndarray
    """``(F,)`` fine bins spanned by ``[0, R]``."""
    top_values: np.ndarray
    top_tokens: np.ndarray
    top_windows: np.ndarray
    sample_keys: np.ndarray
    sample_values: np.ndarray
    sample_tokens: np.ndarray
    sample_windows: np.ndarray
    buffer: tuple[int, int]

    @property
    def density(self) -> np.ndarray:
        """``(F,)`` fraction of counted positions where each feature fires (``frac_nonzero``)."""
        return self.count / max(self.n_tokens, 1)

    @property
    def mean_nonzero(self) -> np.ndarray:
        """``(F,)`` mean of the non-zero activations (0 for a dead feature)."""
        return np.divide(self.sum, self.count, out=np.zeros_like(self.sum), where=self.count > 0)

    @property
    def std_nonzero(self) -> np.ndarray:
        """``(F,)`` standard deviation of the non-zero activations."""
        mean_sq = np.divide(self.sum_sq, self.count, out=np.zeros_like(self.sum), where=self.count > 0)
        return np.sqrt(np.maximum(mean_sq - self.mean_nonzero**2, 0.0))

    def histogram(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Feature ``i``'s ``HIST_BINS`` counts of non-zero activations over ``[0, R]`` and the edges."""
        n_fine = int(self.n_fine[i])
        counts = self.fine_hist[i, :n_fine].reshape(HIST_BINS, -1).sum(1)
        return counts, np.linspace(0.0, float(self.reach[i]), HIST_BINS + 1)

    def quantiles(self, i: int, qs: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99)) -> list[float]:
        """Quantiles of feature ``i``'s non-zero activations from the fine histogram (interpolated)."""
        counts = self.fine_hist[i]
        total = counts.sum()
        if total == 0:
            return [0.0] * len(qs)
        cumulative = np.concatenate([[0], np.cumsum(counts)])
        edges = np.arange(FINE_BINS + 1) * self.hi[i] / FINE_BINS
        return [float(min(np.interp(q * total, cumulative, edges), self.max[i])) for q in qs]

    def top(self, i: int) -> list[tuple[float, int, np.ndarray]]:
        """Feature ``i``'s top examples: (activation, global token, window), largest first, non-zero only."""
        keep = self.top_values[i] > 0
        return list(
            zip(self.top_values[i][keep], self.top_tokens[i][keep], self.top_windows[i][keep], strict=True)
        )

    def intervals(self, i: int) -> list[dict[str, Any]]:
        """Feature ``i``'s ``INTERVALS`` equal-width intervals of ``(0, R]``, each with its share of the
        non-zero activations and its samples ``(activation, global token, window)`` by key."""
        n_fine, total = int(self.n_fine[i]), max(int(self.count[i]), 1)
        groups = n_fine // _PER_GROUP // INTERVALS
        width = self.reach[i] / INTERVALS
        out = []
        for j in range(INTERVALS):
            span = slice(j * groups, (j + 1) * groups)
            keys = self.sample_keys[i, span].reshape(-1)
            order = np.argsort(keys, kind="stable")[: self.sample_keys.shape[2]]
            order = order[keys[order] < _NO_KEY]
            values = self.sample_values[i, span].reshape(-1)[order]
            tokens = self.sample_tokens[i, span].reshape(-1)[order]
            windows = self.sample_windows[i, span].reshape(-1, self.top_windows.shape[2])[order]
            contains = self.fine_hist[i, j * groups * _PER_GROUP : (j + 1) * groups * _PER_GROUP].sum()
            out.append(
                {
                    "bin_min": float(j * width),
                    "bin_max": float((j + 1) * width),
                    "bin_contains": float(contains / total),
                    "samples": list(zip(values, tokens, windows, strict=True)),
                }
            )
        return out


@dataclass
class LogitEffects:
    """Each feature's decoder direction read through the unembedding (``W_dec[f] @ W_U``)."""

    pos_tokens: np.ndarray
    """``(F, k)`` most promoted token ids, largest first."""
    pos_values: np.ndarray
    neg_tokens: np.ndarray
    """``(F, k)`` most suppressed token ids, most negative first."""
    neg_values: np.ndarray
    hist_counts: np.ndarray
    """``(F, HIST_BINS)`` histogram of all d_vocab logit effects over ``[min, max]``."""
    hist_edges: np.ndarray
    """``(F, HIST_BINS + 1)``."""
    decoder_norm: np.ndarray
    """``(F,)``."""


def logit_effects(w_dec: torch.Tensor, w_u: torch.Tensor, k: int = 10, chunk: int = 256) -> LogitEffects:
    """Logit effects of decoder rows ``w_dec`` ``(F, d_model)`` through ``w_u`` ``(d_model, d_vocab)``,
    ``chunk`` features at a time (a ``(chunk, d_vocab)`` block in memory)."""
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("pt", "pv", "nt", "nv", "hc", "he")}
    w_u = w_u.float()
    with torch.no_grad():
        for start in range(0, w_dec.shape[0], chunk):
            logits = w_dec[start : start + chunk].float() @ w_u  # (c, d_vocab)
            pos, neg = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
            parts["pt"].append(pos.indices)
            parts["pv"].append(pos.values)
            parts["nt"].append(neg.indices)
            parts["nv"].append(neg.values)
            low, high = logits.min(1).values, logits.max(1).values
            span = torch.where(high > low, high - low, 1.0)
            bins = ((logits - low[:, None]) / span[:, None] * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
            counts = torch.zeros(len(logits), HIST_BINS, dtype=torch.int64)
            parts["hc"].append(counts.scatter_add_(1, bins, torch.ones_like(bins)))
            steps = torch.linspace(0, 1, HIST_BINS + 1)[None, :]
            parts["he"].append(low[:, None] + steps * span[:, None])
    out = {name: torch.cat(tensors).numpy() for name, tensors in parts.items()}
    norm = w_dec.float().norm(dim=1).numpy()
    return LogitEffects(out["pt"], out["pv"], out["nt"], out["nv"], out["hc"], out["he"], norm)


def _centers(edges: np.ndarray) -> list[float]:
    return [float(x) for x in (edges[:-1] + edges[1:]) / 2]


def neuronpedia_record(
    table: FeatureTable,
    effects: LogitEffects,
    i: int,
    token_text: Any,
    window_tokens: Any,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Feature ``i`` in the schema of Neuronpedia's feature JSON (as SAEDashboard exports it).

    ``token_text(ids)`` turns token ids into strings; ``window_tokens(token)`` gives the token ids
    of a global token's window (``-1`` outside the passage). Histogram ``_values`` are bin centres,
    parallel to ``_heights``. ``activations`` holds the top examples (``bin_min = -1``) then the
    interval samples, each with ``tokens``, ``values`` and ``qualifying_token_index``.
    """
    counts, edges = table.histogram(i)
    groups = [_activation(table, -1.0, float(table.max[i]), -1.0, table.top(i), token_text, window_tokens)]
    for interval in table.intervals(i):
        groups.append(
            _activation(
                table,
                interval["bin_min"],
                interval["bin_max"],
                interval["bin_contains"],
                interval["samples"],
                token_text,
                window_tokens,
            )
        )
    return {
        "feature_index": int(table.feature_ids[i]),
        "frac_nonzero": float(table.density[i]),
        "max_activation": float(table.max[i]),
        "pos_str": token_text(effects.pos_tokens[i]),
        "pos_values": [float(v) for v in effects.pos_values[i]],
        "neg_str": token_text(effects.neg_tokens[i]),
        "neg_values": [float(v) for v in effects.neg_values[i]],
        "freq_hist_data_bar_heights": [int(c) for c in counts],
        "freq_hist_data_bar_values": _centers(edges),
        "logits_hist_data_bar_heights": [int(c) for c in effects.hist_counts[i]],
        "logits_hist_data_bar_values": _centers(effects.hist_edges[i]),
        "decoder_norm": float(effects.decoder_norm[i]),
        "activations": [group for groups_ in groups for group in groups_],
        **(extra or {}),
    }


def _activation(
    table: FeatureTable,
    bin_min: float,
    bin_max: float,
    bin_contains: float,
    examples: list[tuple[float, int, np.ndarray]],
    token_text: Any,
    window_tokens: Any,
) -> list[dict[str, Any]]:
    out = []
    for _value, token, window in examples:
        ids = window_tokens(int(token))
        inside = ids >= 0
        out.append(
            {
                "bin_min": bin_min,
                "bin_max": bin_max,
                "bin_contains": bin_contains,
                "tokens": token_text(ids[inside]),
                "values": [float(v) for v in window[inside]],
                "qualifying_token_index": int(np.count_nonzero(inside[: table.buffer[0]])),
            }
        )
    return out
