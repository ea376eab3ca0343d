"""The episode predictor over a trained CST model and the feature store (the `fscs.evaluation.episodes`
protocol).

``predict(query_id, support_classes, support_ids)`` scores each class of the episode from its K shots by the
model's ``kshot`` rule: ``joint`` runs the query against all K supports in one forward pass (block 1 attends
over every support's positions, `fscs.learn.model.transformer.join_shots`); ``mean_prob`` / ``mean_logit``
score every (query, support image) pair independently and average the K probabilities or log-odds. The
result: presence probability p(present) (N,) and foreground probability maps (N, 2gh, 2gw), shifted so that
the model's calibrated thresholds (``presence_threshold``, ``fg_threshold``, `fscs.learn.calibration`) fall
on 0.5. The decision rules (presence > 0.5, argmax / 0.5 on foreground) are applied by
`fscs.evaluation.episodes`. What is scored is an item (query, supports, class): one support per item under
the per-pair rules, a class's K supports under ``joint`` (one support: the same forward either way).

Support masks come from a callable ``support_mask(image_id, class_id) -> bool (h, w)``; the setting's
test-time rule is `fscs.learn.targets.Targets.test_support_mask` (GT for ``pixel``, raw self pseudo-mask for
``image``, enhanced self pseudo-mask for ``mixed``).

An item's result depends only on (query, supports, support masks); with ``mask_depends_on_class`` False
(pseudo masks) the class is not part of the key. Results are cached, so an item shared by several episodes
(episode i of each (way, shot) list shares its query and usually its first support) is computed once.
`prefetch(episodes)` computes all distinct items of an episode list up front, sorted by query, in large
batches; each image's prepared (normalized, per-head, support-downsampled) features are computed once and
kept in a bounded cache, so a query or support image shared by many pairs is prepared once.

With ``workers`` > 1 on the CPU, `prefetch` scores the batches in that many threads, each running torch
single-threaded with its own prepared-feature cache. A pair's numbers then depend only on its batch, never on
the worker count or the order the workers finish in (the same as ``workers=1`` with one torch thread).
`scoring_workers` picks the faster design for a model: with torch's attention (thousands of tiny SDPA calls
per batch) the workers win, with the fused attention kernel one batch at a time on every thread does.

The model runs on the device its parameters are on (tokens stay in RAM and move per batch); results come
back to the CPU as numpy arrays.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fscs.core.errors import FscsError
from fscs.core.lru import LRUCache
from fscs.learn.calibration import log_odds, shift, sigmoid
from fscs.learn.model.cst import CST

#: What the predictor scores: (query id, its supports (one, or a class's K shots under ``joint``), class).
Item = tuple[str, tuple[str, ...], int]


def pair_count(items: Iterable[Item]) -> int:
    """The (query, support) pairs that ``items`` score: a joint item counts each of its K supports."""
    return sum(len(p[1]) for p in items)


def combine_shots(p: np.ndarray, rule: str) -> np.ndarray:
    """K shots' probabilities (K, ...) -> one: their mean (``mean_prob``) or the probability of their mean
    log-odds (``mean_logit``); under ``joint`` the one prediction of all K."""
    if rule == "joint":
        return p[0]  # one joint prediction already
    return sigmoid(log_odds(p).mean(axis=0)) if rule == "mean_logit" else p.mean(axis=0)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TokenBank:
    """Backbone tokens (float16) read from a FeatureStore on demand and kept under a byte budget.

    ``budget_bytes`` (None: keep every image read) bounds the RAM the tokens take, whatever the dataset's
    size; an evicted image is read again when asked for, so the budget decides what is re-read, never a
    value. Rows live in slabs of `SLAB_ROWS` rows allocated once and reused, least recently used first:
    caching each row in its own buffer let the C heap fragment, so the resident set grew with every image
    read (about 0.65 MB each at 50x50 tokens) while the cache held its budget. A store that keeps its own
    encodings under the budget (`fscs.features.online.OnlineStore`, ``keeps_rows``) is read through, so
    the two never hold two copies. Scoring workers share one bank (a lock guards the store and the cache)."""

    SLAB_ROWS = 64

    def __init__(self, store: Any, budget_bytes: int | None = None):
        self.store = store
        self.budget_bytes = budget_bytes
        self._through = bool(getattr(store, "keeps_rows", False))
        self._slot: OrderedDict[str, int] = OrderedDict()  # image id -> its row in the slabs, oldest first
        self._slabs: list[torch.Tensor] = []
        self._capacity: int | None = None  # rows the budget allows, known at the first read
        self._lock = threading.Lock()
        self.reads = 0  # rows read from the store (more than the images asked for once the budget is full)
        self.peak_bytes = 0  # the most bytes of tokens held at once

    def require(self, image_ids: Iterable[str], what: str, hint: str = "") -> None:
        """FscsError naming the store file when any of ``image_ids`` (``what``, e.g. "training images") is
        not in the store; ``hint`` says how to fix it."""
        missing = sorted({str(i) for i in image_ids if str(i) not in self.store})
        if missing:
            where = getattr(self.store, "path", "the feature store")
            raise FscsError(
                f"{where}: {len(missing)} {what} are not in the store (first: {missing[0]!r})"
                + (f"; {hint}" if hint else "")
            )

    def get(self, image_ids: Sequence[str], pin: bool = False) -> torch.Tensor:
        """(B, L, 1+P, D) float16 tokens of the images, in order; ``pin``: in page-locked memory, for an
        asynchronous copy to a CUDA device."""
        with self._lock:
            first = self._row(image_ids[0])
            out = torch.empty((len(image_ids), *first.shape), dtype=first.dtype, pin_memory=pin)
            out[0] = first
            for j, image_id in enumerate(image_ids[1:], start=1):
                out[j] = self._row(image_id)  # copied at once: a later read may reuse the row's slot
        return out

    def _row(self, image_id: str) -> torch.Tensor:
        """The image's tokens: its slot in the slabs, read into the least recently used one when absent."""
        if self._through:
            self.reads += 1
            return torch.from_numpy(np.asarray(self.store.tokens(image_id), dtype=np.float16))
        slot = self._slot.get(image_id)
        if slot is not None:
            self._slot.move_to_end(image_id)
            return self._view(slot)
        row = torch.from_numpy(np.asarray(self.store.tokens(image_id), dtype=np.float16))
        self.reads += 1
        if self._capacity is None and self.budget_bytes is not None:
            self._capacity = max(1, self.budget_bytes // row.nbytes)
        if self._capacity is not None and len(self._slot) >= self._capacity:
            slot = self._slot.popitem(last=False)[1]
        else:
            slot = len(self._slot)
            if slot == len(self._slabs) * self.SLAB_ROWS:
                rows = min(self.SLAB_ROWS, (self._capacity or slot + self.SLAB_ROWS) - slot)
                with torch.inference_mode(False):  # a slab first filled in inference mode serves training too
                    self._slabs.append(torch.empty((rows, *row.shape), dtype=row.dtype))
        self._slot[image_id] = slot
        view = self._view(slot)
        view.copy_(row)
        self.peak_bytes = max(self.peak_bytes, len(self._slot) * row.nbytes)
        return view

    def _view(self, slot: int) -> torch.Tensor:
        return self._slabs[slot // self.SLAB_ROWS][slot % self.SLAB_ROWS]


class PreparedBank:
    """Each image's prepared (normalised, per-head; support also downsampled) features, kept under a budget.

    Preparing has no trainable parameters, so re-preparing the same tokens every batch (fp16 -> fp32 copies
    of every layer, the support interpolation) only costs time: about a third of a training step. An image's
    prepared features do not depend on the batch it was prepared in (`tests/test_memory_budget.py`), so
    ``budget_bytes`` (None: keep all), shared by the three kinds with the least recently used going first,
    decides what is prepared again, never a value. The features live on the model's device."""

    def __init__(self, model: CST, tokens: TokenBank, budget_bytes: int | None = None):
        self.model = model
        self.tokens = tokens
        self.device = next(model.parameters()).device
        self._cache = LRUCache(max_bytes=budget_bytes)
        self._prepare = {
            "query": model.prepare_query,
            "support": model.prepare_support,
            "prior": model.prepare_prior,
        }

    @property
    def peak_bytes(self) -> int:
        """The most bytes of prepared features held at once."""
        return self._cache.peak_bytes

    def get(self, kind: str, image_ids: Sequence[str]) -> torch.Tensor:
        """Prepared query (B, C, Pq, d), support (B, C, 1+S*S, d) or prior (B, P, D) features, float32."""
        keys = [(kind, i) for i in image_ids]
        todo = [i for i in dict.fromkeys(image_ids) if (kind, i) not in self._cache]
        got: dict[str, torch.Tensor] = {}
        if todo:
            with torch.no_grad():
                cuda = self.device.type == "cuda"
                raw = self.tokens.get(todo, pin=cuda).to(self.device, non_blocking=cuda)
                prep = self._prepare[kind](raw)
            for i, image_id in enumerate(todo):
                got[image_id] = prep[i].clone()
        out = torch.stack(
            [got[i] if i in got else self._cache[k] for i, k in zip(image_ids, keys, strict=True)]
        )
        for image_id, value in got.items():
            self._cache[(kind, image_id)] = value
        for k in keys:
            self._cache.move_to_end(k)
        self._cache.trim()
        return out

    def priors(
        self, query_ids: Sequence[str], support_ids: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prepared (query, support) prior vectors `CST.forward_prepared` takes, or None when the model
        has no prior map."""
        if not self.model.uses_prior:
            return None
        return self.get("prior", query_ids), self.get("prior", support_ids)


def scoring_workers(model: CST, threads: int) -> int:
    """Scoring workers for `CSTPredictor.prefetch` on ``threads`` CPU threads: 1 (one batch at a time, every
    op on all threads) with the fused attention kernel, which parallelises its problems itself (1.1-1.3x the
    workers, `benchmarks/train.py`); ``threads`` single-threaded workers with torch's attention (1.2-1.4x)."""
    return 1 if model.config.attention == "fused" else max(1, int(threads))


class CSTPredictor:
    """N-way K-shot predictions of a CST model from stored tokens.

    model: a `CST` (put in eval mode here); tokens: a `TokenBank` (or a FeatureStore, wrapped);
    support_mask: ``(image_id, class_id) -> bool mask``; mask_depends_on_class: whether that mask changes
    with the class (GT masks) or not (pseudo-masks), which decides the cache key; workers: single-threaded
    scoring threads `prefetch` uses on the CPU (1: the calling thread, with torch's thread setting);
    prepared_bytes: the budget of prepared features, shared by the workers (None: keep all).
    """

    def __init__(
        self,
        model: CST,
        tokens: Any,
        support_mask: Callable[[str, int], np.ndarray],
        mask_depends_on_class: bool = True,
        batch_size: int = 32,
        cache_size: int = 100_000,
        workers: int = 1,
        prepared_bytes: int | None = None,
    ):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.tokens = tokens if isinstance(tokens, TokenBank) else TokenBank(tokens)
        self.support_mask = support_mask
        self.mask_depends_on_class = bool(mask_depends_on_class)
        self.batch_size = int(batch_size)
        self.workers = max(1, int(workers))
        self.prepared_bytes = prepared_bytes
        self._mask_lock = threading.Lock()  # support masks come from shared caches (and files)
        self._cache = LRUCache(int(cache_size))  # pair results; `prefetch` may raise the bound
        self.pairs_computed = 0
        self.prepared = self._bank()

    @classmethod
    def for_targets(
        cls,
        model: CST,
        tokens: Any,
        targets: Any,
        batch_size: int,
        workers: int,
        prepared_bytes: int | None = None,
    ) -> CSTPredictor:
        """The predictor with a setting's test-time support masks (`fscs.learn.targets.Targets`): what
        validation, evaluation and the report's figures run."""
        return cls(
            model,
            tokens,
            targets.test_support_mask,
            targets.test_mask_depends_on_class,
            batch_size=batch_size,
            workers=workers,
            prepared_bytes=prepared_bytes,
        )

    def _bank(self) -> PreparedBank:
        """A prepared-feature cache for one scoring thread: its share of the budget."""
        budget = None if self.prepared_bytes is None else max(1, self.prepared_bytes // self.workers)
        return PreparedBank(self.model, self.tokens, budget)

    @property
    def joint(self) -> bool:
        """Whether a class's K shots are scored in one forward pass (``kshot: joint``), not pair by pair."""
        return self.model.config.kshot == "joint"

    def _items(self, query_id: str, class_id: int, shots: Sequence[str]) -> list[Item]:
        """What is scored for one class of an episode: its K supports as one item (``joint``), else one
        item per support."""
        groups = [tuple(str(s) for s in shots)] if self.joint else [(str(s),) for s in shots]
        return [(str(query_id), g, int(class_id)) for g in groups]

    def _key(self, query_id: str, supports: tuple[str, ...], class_id: int) -> tuple:
        return (query_id, supports, int(class_id) if self.mask_depends_on_class else None)

    @torch.inference_mode()
    def _run(self, items: list[Item], bank: PreparedBank | None = None) -> list[tuple[float, np.ndarray]]:
        """Forward (query, supports, class) items of one shot count in one batch -> [(p_present, p_fg
        (2gh, 2gw))], with the prepared features of ``bank`` (default: this predictor's)."""
        bank = self.prepared if bank is None else bank
        shots = len(items[0][1])
        queries = [p[0] for p in items]
        q_ids = queries[:1] if len(set(queries)) == 1 else queries
        s_ids = [s for p in items for s in p[1]]
        q = bank.get("query", q_ids)
        s = bank.get("support", s_ids)
        prior = bank.priors(q_ids, s_ids)
        with self._mask_lock:
            masks = [np.asarray(self.support_mask(s, p[2]), dtype=bool) for p in items for s in p[1]]
        cls_logits, seg_logits = self.model.forward_prepared(
            q, s, torch.from_numpy(np.stack(masks)).to(self.device), prior, shots
        )
        present = torch.softmax(cls_logits.float(), dim=1)[:, 1].cpu().numpy()
        fg = torch.softmax(seg_logits.float(), dim=1)[:, 1].cpu().numpy()
        return [(float(present[i]), fg[i]) for i in range(len(items))]

    def _store(self, items: list[Item], values: list[tuple[float, np.ndarray]]) -> None:
        for p, value in zip(items, values, strict=True):
            self._cache.put(self._key(*p), value)
        self.pairs_computed += pair_count(items)

    def _batches(self, items: Sequence[Item]) -> list[list[Item]]:
        """Items in batches of one query and one shot count, about ``batch_size`` pairs each."""
        groups: dict[tuple[str, int], list[Item]] = {}
        for p in items:
            groups.setdefault((p[0], len(p[1])), []).append(p)
        out = []
        for (_, shots), group in groups.items():
            step = max(1, self.batch_size // shots)
            out += [group[start : start + step] for start in range(0, len(group), step)]
        return out

    def pair_scores(self, items: Sequence[Item]) -> list[tuple[float, np.ndarray]]:
        """(p_present, p_fg) for each (query, supports, class), from the cache or computed in batches."""
        keys = [self._key(*p) for p in items]
        todo: dict[tuple, Item] = {}
        for k, p in zip(keys, items, strict=True):
            if k not in self._cache and k not in todo:
                todo[k] = p
        for batch in self._batches(list(todo.values())):
            self._store(batch, self._run(batch))
        return [self._cache[k] for k in keys]

    def predict(
        self, query_id: str, support_classes: Sequence[int], support_ids: Sequence[Sequence[str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """presence probability (N,) and foreground probability (N, 2gh, 2gw) of each class from its K shots
        (by the model's ``kshot`` rule)."""
        per_class = [
            self._items(query_id, c, shots) for c, shots in zip(support_classes, support_ids, strict=True)
        ]
        scores = self.pair_scores([p for items in per_class for p in items])
        rule = self.model.config.kshot
        presence, fg, i = [], [], 0
        for items in per_class:
            group = scores[i : i + len(items)]
            i += len(items)
            presence.append(combine_shots(np.asarray([g[0] for g in group]), rule))
            fg.append(combine_shots(np.stack([g[1] for g in group]), rule))
        cfg = self.model.config
        presence = shift(np.asarray(presence), cfg.presence_threshold)
        return presence.astype(np.float32), shift(np.stack(fg), cfg.fg_threshold).astype(np.float32)

    def prefetch(self, episodes: Any, progress: bool | None = None) -> int:
        """Compute every item of an episode frame in large batches (then `predict` reads the cache).

        Returns the number of (query, support) pairs computed (a joint K-shot item counts K)."""
        todo: dict[tuple, Item] = {}
        for row in episodes.itertuples(index=False):
            for c, shots in zip(row.support_classes, row.support_ids, strict=True):
                for p in self._items(row.query_id, c, shots):
                    k = self._key(*p)
                    if k not in self._cache:
                        todo.setdefault(k, p)
        items = sorted(todo.values())  # by query: its prepared features are reused batch after batch
        if len(items) > self._cache.maxsize:
            self._cache.maxsize = len(items) + len(self._cache)
        batches = self._batches(items)  # one query per batch: its features are shared, not copied
        pairs = pair_count(items)
        bar = tqdm(total=pairs, desc="pairs", unit="pair", disable=None if progress else True)
        for batch, values in self._score(batches):
            self._store(batch, values)
            bar.update(pair_count(batch))
        bar.close()
        return pairs

    def _score(self, batches: list[list[Item]]) -> Iterator[tuple[list, list]]:
        """(batch, its scores) for each batch, in order; in ``workers`` single-threaded threads on the CPU."""
        if self.workers == 1 or self.device.type != "cpu":
            yield from ((batch, self._run(batch)) for batch in batches)
            return
        local = threading.local()

        def score(batch: list[Item]) -> tuple[list, list]:
            if not hasattr(local, "bank"):
                local.bank = self._bank()
            return batch, self._run(batch, local.bank)

        with torch_threads(1), ThreadPoolExecutor(self.workers, thread_name_prefix="cst-score") as pool:
            yield from pool.map(score, batches)
