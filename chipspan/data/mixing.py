"""Several datasets -> one stream of rows: concatenated, or interleaved as LLaMA-Factory 0.9.5 does.

``interleave_under`` stops when the first dataset runs out; ``interleave_over`` goes on, restarting
the datasets that ran out, until every one has run out once; ``interleave_once`` lets each dataset
run out and stops when all have. Without ``interleave_probs`` the datasets take turns one row each
(whole turns only, so ``under`` gives every dataset ``min length`` rows and ``over`` ``max length``);
with them, each row comes from a dataset drawn with those probabilities, from a generator seeded
with ``seed``. The meaning follows ``datasets.interleave_datasets`` (stopping strategies
``first_exhausted``/``all_exhausted``/``all_exhausted_without_replacement``); the random order differs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from chipspan.errors import ChipspanError

# Draws taken from the generator at a time.
_DRAWS = 1024


def parse_probs(mix_strategy: str, interleave_probs: str | None, datasets: int) -> list[float] | None:
    """The sampling probabilities, checked against the strategy and the number of datasets."""
    if interleave_probs is None:
        return None
    if mix_strategy == "concat":
        raise ChipspanError(
            "interleave_probs needs --mix_strategy interleave_under, interleave_over "
            "or interleave_once (concat takes every row)"
        )
    try:
        probs = [float(p) for p in str(interleave_probs).split(",")]
    except ValueError:
        raise ChipspanError(f"interleave_probs must be a comma list of numbers, not '{interleave_probs}'") from None
    if len(probs) != datasets:
        raise ChipspanError(
            f"interleave_probs has {len(probs)} values for {datasets} datasets: give one per "
            "dataset, in --dataset order"
        )
    if any(not math.isfinite(p) or p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ChipspanError(
            f"interleave_probs must be non-negative and sum to 1, got {interleave_probs} (sum {sum(probs):g})"
        )
    return probs


def mix(
    sources: list[Callable[[], Iterable]], strategy: str, probs: list[float] | None = None, seed: int = 42
) -> Iterator:
    """One stream from the ``sources``, each a function that starts its dataset over (lazily).

    A dataset that is restarted (``interleave_over``) is read again from its start.
    """
    if strategy == "concat" or len(sources) == 1:
        return itertools.chain.from_iterable(source() for source in sources)
    return _interleave(sources, strategy, probs, seed)


class _Cursor:
    """One dataset being read, one row ahead, so that the row that finishes it is known as it is taken."""

    def __init__(self, source: Callable[[], Iterable]):
        self.source = source
        self.rows = iter(source())
        self.ahead = next(self.rows, _END)
        self.empty = self.ahead is _END
        self.finished = self.empty  # has run out at least once

    def take(self, restart: bool) -> object:
        row, self.ahead = self.ahead, next(self.rows, _END)
        if self.ahead is _END:
            self.finished = True
            if restart:
                self.rows = iter(self.source())
                self.ahead = next(self.rows, _END)
        return row

    @property
    def done(self) -> bool:
        return self.ahead is _END


_END = object()


def _interleave(sources, strategy: str, probs: list[float] | None, seed: int) -> Iterator:
    cursors = [_Cursor(source) for source in sources]
    drawn = [i for i in range(len(cursors)) if probs is None or probs[i] > 0]
    if strategy == "interleave_under" and any(cursors[i].empty for i in drawn):
        return  # a dataset with no rows runs out at once
    wanted = [i for i in drawn if not cursors[i].empty]
    if not wanted:
        return
    whole_turns = probs is None and strategy != "interleave_once"
    restart = strategy == "interleave_over"
    for index in _order(wanted, probs, seed, cursors):
        if cursors[index].done:  # an empty dataset, or one that ran out under interleave_once
            continue
        yield cursors[index].take(restart)
        if (not whole_turns or index == wanted[-1]) and _stop(strategy, cursors, wanted):
            return


def _order(wanted: list[int], probs: list[float] | None, seed: int, cursors: list[_Cursor]) -> Iterator[int]:
    """The dataset of each next row: turns, or draws with ``probs`` (renormalised as datasets finish)."""
    if probs is None:
        yield from itertools.cycle(wanted)
        return
    rng = np.random.default_rng(seed)
    weights = np.asarray(probs, dtype=float)
    while True:
        p = np.where([not cursor.done for cursor in cursors], weights, 0.0)
        yield from rng.choice(len(weights), size=_DRAWS, p=p / p.sum()).tolist()


def _stop(strategy: str, cursors: list[_Cursor], wanted: list[int]) -> bool:
    if strategy == "interleave_under":
        return any(cursors[i].finished for i in wanted)
    if strategy == "interleave_over":
        return all(cursors[i].finished for i in wanted)
    return all(cursors[i].done for i in wanted)
