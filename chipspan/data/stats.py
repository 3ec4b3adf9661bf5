"""What happened to a dataset's rows on the way to examples: read, kept, dropped (and why), tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# How many places (``toy row 2``) are kept per drop reason, to show the user where to look.
FIRST_PLACES = 3


@dataclass
class DataStats:
    """Counts for one load. ``dropped`` maps a reason to rows, ``first_dropped`` a reason to the first
    few places it happened (``"toy line 3"``); ``truncated`` counts examples cut to ``cutoff_len``;
    ``tokens`` is summed over all examples, train and eval."""

    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_dropped: dict[str, list[str]] = field(default_factory=dict)
    train: int = 0
    eval: int = 0
    tokens: int = 0
    truncated: int = 0
    from_cache: bool = False

    def drop(self, reason: str, place: str) -> None:
        """Count one row read and dropped for ``reason`` at ``place``."""
        self.rows_read += 1
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        places = self.first_dropped.setdefault(reason, [])
        if len(places) < FIRST_PLACES:
            places.append(place)

    def keep(self) -> None:
        """Count one row read and kept."""
        self.rows_read += 1
        self.rows_kept += 1

    def unkeep(self, reason: str, place: str) -> None:
        """A row counted as kept turned out unusable after all (after encoding): count it dropped."""
        self.rows_read -= 1
        self.rows_kept -= 1
        self.drop(reason, place)

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def reasons(self, places: int = FIRST_PLACES) -> str:
        """``"2 line is not valid JSON (first: toy line 3, toy line 7); ..."``, most frequent first."""
        ordered = sorted(self.dropped.items(), key=lambda item: -item[1])
        return "; ".join(
            f"{n} {reason} (first: {', '.join(self.first_dropped[reason][:places])})" for reason, n in ordered
        )

    def summary(self) -> str:
        """One line (two with drops) for the log."""
        source = " (from the cache)" if self.from_cache else ""
        line = (
            f"data{source}: {self.rows_read:,} rows read, {self.rows_kept:,} kept, "
            f"{self.rows_dropped:,} dropped; {self.train:,} train + {self.eval:,} eval examples, "
            f"{self.tokens:,} tokens, {self.truncated:,} truncated to cutoff_len"
        )
        return line + (f"\ndropped rows: {self.reasons()}" if self.dropped else "")

    def as_eval(self) -> DataStats:
        """These counts with every example counted as eval (a load of --eval_dataset)."""
        return replace(self, train=0, eval=self.train + self.eval)

    def plus(self, other: DataStats) -> DataStats:
        """The counts of two loads together (from the cache only if both were)."""
        dropped = {r: self.dropped.get(r, 0) + other.dropped.get(r, 0) for r in {*self.dropped, *other.dropped}}
        places = {r: (self.first_dropped.get(r, []) + other.first_dropped.get(r, []))[:FIRST_PLACES] for r in dropped}
        numbers = ("rows_read", "rows_kept", "train", "eval", "tokens", "truncated")
        return DataStats(
            **{name: getattr(self, name) + getattr(other, name) for name in numbers},
            dropped=dropped,
            first_dropped=places,
            from_cache=self.from_cache and other.from_cache,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataStats:
        return cls(**data)
