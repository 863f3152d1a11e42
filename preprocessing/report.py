"""What the RetailRocket ETL kept and dropped, and why: one dataclass, logged and saved as JSON."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ETLReport", "SplitStats"]


@dataclass
class SplitStats:
    """Rows (sequences) and events written to one split, and what was dropped from it.

    Args:
        rows (int): sequences written (one parquet row each).
        events (int): events inside those rows before ``ListSlice`` truncation.
        short_rows_dropped (int): rows with fewer than 2 events (no next-event target).
        short_row_events_dropped (int): events inside the dropped short rows.
        truncated_rows (int): written rows longer than ``max_len`` (only the last ``max_len`` kept).
        files (list[str]): written parquet shards.
    """

    rows: int = 0
    events: int = 0
    short_rows_dropped: int = 0
    short_row_events_dropped: int = 0
    truncated_rows: int = 0
    files: list[str] = field(default_factory=list)


@dataclass
class ETLReport:
    """Counts of everything the ETL read, kept and dropped (nothing is dropped silently).

    Args:
        events_read (int): rows of ``events.csv``.
        duplicate_events_dropped (int): exact duplicate rows of ``events.csv`` (all columns).
        unknown_events_dropped (dict[str, int]): unknown event type -> rows dropped (only with
            ``on_unknown_event="drop"``; the default raises).
        events_kept (int): events after cleaning (the input of sessionisation).
        property_rows_read (int): rows of both item-property files.
        categoryid_rows (int): ``categoryid`` rows among them.
        duplicate_categoryid_rows_dropped (int): exact duplicate ``categoryid`` rows.
        items_with_category (int): items with at least one ``categoryid`` row.
        events_category_from_earliest (int): events before their item's first ``categoryid``
            row; they get the earliest known value.
        events_without_category (int): events of items never categorised (encoded as null, 1).
        categories_in_tree (int): rows of ``category_tree.csv`` (after exact duplicates).
        duplicate_tree_rows_dropped (int): exact duplicate rows of ``category_tree.csv``.
        root_categories (int): categories without a parent.
        categories_missing_from_tree (int): categoryids used by items but absent from the tree
            (each is treated as its own top-level category).
        sessions (int): sessions after splitting at gaps of more than ``session_gap_minutes``.
        single_event_sessions (int): sessions with one event (never a next-event target).
        visitors (int): distinct visitors.
        splits (dict[str, SplitStats]): per split (``train``, ``valid``, ``test``).
        vocab_sizes (dict[str, int]): embedding rows per categorical column, including the
            reserved ids 0 (padding), 1 (null) and 2 (OOV).
        backend (str): ``"cudf"`` or ``"pandas"``.
        seconds (dict[str, float]): wall time per stage.
        raw_dir (str): the folder the raw files were read from.
        output_dir (str): where the shards, workflow and vocabularies are.
    """

    events_read: int = 0
    duplicate_events_dropped: int = 0
    unknown_events_dropped: dict[str, int] = field(default_factory=dict)
    events_kept: int = 0
    property_rows_read: int = 0
    categoryid_rows: int = 0
    duplicate_categoryid_rows_dropped: int = 0
    items_with_category: int = 0
    events_category_from_earliest: int = 0
    events_without_category: int = 0
    categories_in_tree: int = 0
    duplicate_tree_rows_dropped: int = 0
    root_categories: int = 0
    categories_missing_from_tree: int = 0
    sessions: int = 0
    single_event_sessions: int = 0
    visitors: int = 0
    splits: dict[str, SplitStats] = field(default_factory=dict)
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    backend: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    raw_dir: str = ""
    output_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the report."""
        return asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the report as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line (what was kept, dropped and why).

        Example::

            >>> r = ETLReport(events_read=10, duplicate_events_dropped=1, events_kept=9)
            >>> r.lines()[0]
            'events: read 10, kept 9; dropped 1 exact duplicates, 0 unknown event types {}'
        """
        unknown = sum(self.unknown_events_dropped.values())
        out = [
            f"events: read {self.events_read}, kept {self.events_kept}; dropped "
            f"{self.duplicate_events_dropped} exact duplicates, {unknown} unknown event types "
            f"{self.unknown_events_dropped}",
            f"item properties: {self.property_rows_read} rows, {self.categoryid_rows} categoryid "
            f"rows ({self.duplicate_categoryid_rows_dropped} exact duplicates dropped), "
            f"{self.items_with_category} items categorised",
            f"categories at event time: {self.events_category_from_earliest} events before their "
            f"item's first categoryid row used the earliest value; {self.events_without_category} "
            f"events of never-categorised items are null (id 1)",
            f"category tree: {self.categories_in_tree} categories, {self.root_categories} roots, "
            f"{self.duplicate_tree_rows_dropped} duplicate rows dropped, "
            f"{self.categories_missing_from_tree} item categories missing from the tree "
            f"(treated as roots)",
            f"sessions: {self.sessions} from {self.visitors} visitors; "
            f"{self.single_event_sessions} single-event sessions (no next-event target)",
        ]
        for name, s in self.splits.items():
            out.append(
                f"split {name}: wrote {s.rows} rows / {s.events} events in {len(s.files)} shards; "
                f"dropped {s.short_rows_dropped} rows shorter than 2 events "
                f"({s.short_row_events_dropped} events); {s.truncated_rows} rows truncated to max_len"
            )
        if self.vocab_sizes:
            out.append(f"vocabulary sizes (incl. reserved 0/1/2): {self.vocab_sizes}")
        return out

    def log(self) -> None:
        """Log :meth:`lines` at INFO level."""
        for line in self.lines():
            logger.info(line)
