"""Synthetic RetailRocket: the four Kaggle files, seeded, with sequential structure planted.

The real RetailRocket raw files (``events.csv``, ``item_properties_part{1,2}.csv``,
``category_tree.csv``) are not redistributable here, so this module writes files in exactly their
format and column order, from a 100k-event demo (the default) up to the real size
(:meth:`SyntheticConfig.full`: 2,756,101 events, 417,053 items, 1,669 categories).

What is planted, so that a sequence model can beat popularity by a wide margin:

* a category tree with a few roots and two or three levels; items live in the leaves;
* Zipf-like item popularity (popularity is a fair, nontrivial baseline);
* item transitions: every item has a few likely successors in its own category (a Markov chain),
  so the next item is far more predictable from the current one than from popularity;
* per-session category drift: a session's current category changes slowly, usually to a sibling
  leaf of the same parent;
* funnels: add-to-cart only happens on a repeated view of the same item, and a transaction of the
  same item often follows an add-to-cart;
* time-varying ``categoryid``: some items are moved to another category at a weekly snapshot, and
  some items get their first ``categoryid`` row only after their first events (the ETL then uses the
  earliest known value); a few items are never categorised at all;
* sessions: events of one session are at most 25 minutes apart and a visitor's sessions are more
  than 31 minutes apart, so a 30-minute sessioniser recovers the generated sessions exactly; about a
  fifth of the sessions have a single event (the ETL drops and counts those).

Everything is vectorised with numpy (a loop over positions, never over events; the pieces are in
:mod:`~torchrec_mamba_preprocessing.synthetic_world`): 100k events take about a second, the full
size 12-30 s including CSV writing on 2 shared cores. The same config and seed give
byte-identical files.

Command line::

    python -m torchrec_mamba_preprocessing.synthetic --out data/rr_synth            # 100k demo
    python -m torchrec_mamba_preprocessing.synthetic --out data/rr_full --full      # real size
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from . import synthetic_world as world

logger = logging.getLogger(__name__)

__all__ = [
    "EVENTS_COLUMNS",
    "PROPERTIES_COLUMNS",
    "TREE_COLUMNS",
    "SyntheticConfig",
    "SyntheticSummary",
    "SyntheticTables",
    "generate",
    "write_retailrocket",
    "main",
]

#: Column order of each Kaggle file, exactly as in the public dataset.
EVENTS_COLUMNS = ("timestamp", "visitorid", "event", "itemid", "transactionid")
PROPERTIES_COLUMNS = ("timestamp", "itemid", "property", "value")
TREE_COLUMNS = ("categoryid", "parentid")

# Sizes of the real dataset (Kaggle RetailRocket).
_RR_EVENTS = 2_756_101
_RR_ITEMS = 417_053
_RR_CATEGORIES = 1_669
_RR_ROOTS = 25


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and behaviour of the synthetic RetailRocket data.

    Args:
        num_events (int): rows of ``events.csv`` (exact). Default: 100_000.
        num_items (int | None): items in ``item_properties``; ``None`` scales the real ratio
            (417,053 items per 2,756,101 events), at least 50. Default: None.
        num_categories (int | None): categories in ``category_tree.csv``; ``None`` scales with the
            square root of the size up to the real 1,669 (at least 12). Default: None.
        num_roots (int | None): top-level categories; ``None`` keeps the real ratio (25 of 1,669),
            at least 2. Default: None.
        mean_session_length (float): mean length of the multi-event sessions. Default: 5.0.
        single_event_fraction (float): share of sessions with a single event. Default: 0.2.
        max_session_length (int): longest generated session. Default: 100.
        mean_sessions_per_visitor (float): mean sessions per visitor (geometric). Default: 1.6.
        num_days (int): days covered by the event log. Default: 139 (as the real log).
        start_ms (int): first possible event time, ms since epoch. Default: 2015-05-03 00:00 UTC.
        zipf_exponent (float): item popularity exponent (weight ``rank ** -a``). Default: 1.0.
        p_repeat (float): next event repeats the current item (the only path to add-to-cart).
            Default: 0.12.
        p_successor (float): next item is one of the current item's successors. Default: 0.6.
        p_same_category (float): next item is a popular item of the current category.
            Default: 0.13. The rest (``1 - p_repeat - p_successor - p_same_category``) drifts to
            another category.
        p_sibling (float): a drift goes to a sibling leaf (same parent). Default: 0.7.
        p_cart (float): a repeated view becomes an add-to-cart. Default: 0.35.
        p_transaction (float): an add-to-cart is followed by a transaction of the item.
            Default: 0.5.
        num_successors (int): successors per item. Default: 3.
        category_change_fraction (float): share of items whose ``categoryid`` changes once.
            Default: 0.05.
        late_category_fraction (float): share of items whose first ``categoryid`` row comes one
            or two weekly snapshots after the first one. Default: 0.1.
        uncategorised_fraction (float): share of items that never get a ``categoryid``.
            Default: 0.01.
        seed (int): random seed. Default: 0.

    Example::

        >>> cfg = SyntheticConfig(num_events=1_000)
        >>> cfg.resolved().num_items, cfg.resolved().num_categories, cfg.resolved().num_roots
        (151, 32, 2)
        >>> SyntheticConfig.full().num_events
        2756101
    """

    num_events: int = 100_000
    num_items: int | None = None
    num_categories: int | None = None
    num_roots: int | None = None
    mean_session_length: float = 5.0
    single_event_fraction: float = 0.2
    max_session_length: int = 100
    mean_sessions_per_visitor: float = 1.6
    num_days: int = 139
    start_ms: int = 1_430_611_200_000
    zipf_exponent: float = 1.0
    p_repeat: float = 0.12
    p_successor: float = 0.6
    p_same_category: float = 0.13
    p_sibling: float = 0.7
    p_cart: float = 0.35
    p_transaction: float = 0.5
    num_successors: int = 3
    category_change_fraction: float = 0.05
    late_category_fraction: float = 0.1
    uncategorised_fraction: float = 0.01
    seed: int = 0

    @classmethod
    def full(cls, seed: int = 0) -> SyntheticConfig:
        """The real RetailRocket sizes: 2,756,101 events, 417,053 items, 1,669 categories."""
        return cls(
            num_events=_RR_EVENTS,
            num_items=_RR_ITEMS,
            num_categories=_RR_CATEGORIES,
            num_roots=_RR_ROOTS,
            seed=seed,
        )

    def resolved(self) -> SyntheticConfig:
        """This config with every ``None`` size filled in and every value validated."""
        if self.num_events < 1:
            raise ValueError(f"num_events must be >= 1, got {self.num_events}")
        num_items = self.num_items
        if num_items is None:
            num_items = max(50, round(self.num_events * _RR_ITEMS / _RR_EVENTS))
        num_categories = self.num_categories
        if num_categories is None:
            scale = math.sqrt(self.num_events / _RR_EVENTS)
            num_categories = min(_RR_CATEGORIES, max(12, round(_RR_CATEGORIES * scale)))
        num_roots = self.num_roots
        if num_roots is None:
            num_roots = max(2, round(num_categories * _RR_ROOTS / _RR_CATEGORIES))
        if num_roots < 1 or num_categories < 2 * num_roots:
            raise ValueError(
                f"need num_roots >= 1 and num_categories >= 2 * num_roots, got "
                f"num_roots={num_roots}, num_categories={num_categories}"
            )
        if num_items < num_categories:
            raise ValueError(
                f"num_items ({num_items}) must be >= num_categories ({num_categories})"
            )
        p_drift = 1.0 - self.p_repeat - self.p_successor - self.p_same_category
        probs = {
            "p_repeat": self.p_repeat,
            "p_successor": self.p_successor,
            "p_same_category": self.p_same_category,
            "p_sibling": self.p_sibling,
            "p_cart": self.p_cart,
            "p_transaction": self.p_transaction,
            "single_event_fraction": self.single_event_fraction,
            "category_change_fraction": self.category_change_fraction,
            "late_category_fraction": self.late_category_fraction,
            "uncategorised_fraction": self.uncategorised_fraction,
        }
        for name, value in probs.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if p_drift < -1e-9:
            raise ValueError(
                "p_repeat + p_successor + p_same_category must be <= 1, got "
                f"{self.p_repeat + self.p_successor + self.p_same_category}"
            )
        if self.mean_session_length < 2.0:
            raise ValueError(f"mean_session_length must be >= 2, got {self.mean_session_length}")
        if self.max_session_length < 2:
            raise ValueError(f"max_session_length must be >= 2, got {self.max_session_length}")
        if self.mean_sessions_per_visitor < 1.0:
            raise ValueError(
                f"mean_sessions_per_visitor must be >= 1, got {self.mean_sessions_per_visitor}"
            )
        if self.num_days < 1:
            raise ValueError(f"num_days must be >= 1, got {self.num_days}")
        if self.num_successors < 1:
            raise ValueError(f"num_successors must be >= 1, got {self.num_successors}")
        return replace(
            self, num_items=num_items, num_categories=num_categories, num_roots=num_roots
        )


@dataclass
class SyntheticSummary:
    """What :func:`generate` planted, for tests and reports.

    Args:
        num_events (int): rows of ``events.csv``.
        num_sessions (int): generated sessions (a 30-minute sessioniser recovers exactly these).
        num_single_event_sessions (int): sessions with one event.
        num_visitors (int): distinct visitors.
        num_items (int): items with properties.
        num_categories (int): rows of ``category_tree.csv``.
        num_roots (int): top-level categories.
        num_property_rows (int): rows of both property files together.
        num_category_changes (int): items whose ``categoryid`` changes at a later snapshot.
        paths (dict[str, Path]): file name -> written path (empty until written).
    """

    num_events: int
    num_sessions: int
    num_single_event_sessions: int
    num_visitors: int
    num_items: int
    num_categories: int
    num_roots: int
    num_property_rows: int
    num_category_changes: int
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass
class SyntheticTables:
    """The four RetailRocket tables in memory (see :func:`generate`).

    Args:
        events (pd.DataFrame): ``events.csv`` rows, columns :data:`EVENTS_COLUMNS`.
        properties (pd.DataFrame): both item-property files together, in file order.
        tree (pd.DataFrame): ``category_tree.csv`` rows.
        summary (SyntheticSummary): what was generated.
    """

    events: pd.DataFrame
    properties: pd.DataFrame
    tree: pd.DataFrame
    summary: SyntheticSummary


def generate(config: SyntheticConfig | None = None) -> SyntheticTables:
    """Generate the four RetailRocket tables in memory (see the module docstring).

    Args:
        config (SyntheticConfig | None): sizes and behaviour; ``None`` is the 100k-event demo.
            Default: None.

    Returns:
        SyntheticTables: ``events``, ``properties`` (both parts together, in file order), ``tree``
        and a :class:`SyntheticSummary`.

    Example::

        >>> t = generate(SyntheticConfig(num_events=500, seed=1))
        >>> len(t.events), list(t.events.columns) == list(EVENTS_COLUMNS)
        (500, True)
        >>> sorted(t.events["event"].unique())
        ['addtocart', 'transaction', 'view']
    """
    cfg = (config or SyntheticConfig()).resolved()
    rng = np.random.default_rng(cfg.seed)
    cat = world.build_catalogue(cfg, rng)
    lengths = world.session_lengths(cfg, rng)
    ev_item, ev_type, ev_gap_ms = world.walk_sessions(cfg, cat, lengths, rng)
    ev_ts, ev_visitor, n_visitors = world.place_in_time(cfg, lengths, ev_gap_ms, rng)
    events = world.events_frame(ev_ts, ev_visitor, ev_type, cat.item_ids[ev_item])
    properties, n_changes = world.item_properties(cfg, cat, rng)
    tree = world.tree_frame(cat, rng)
    summary = SyntheticSummary(
        num_events=cfg.num_events,
        num_sessions=len(lengths),
        num_single_event_sessions=int((lengths == 1).sum()),
        num_visitors=n_visitors,
        num_items=len(cat.item_ids),
        num_categories=len(cat.cat_ids),
        num_roots=int((cat.parent < 0).sum()),
        num_property_rows=len(properties),
        num_category_changes=n_changes,
    )
    return SyntheticTables(events=events, properties=properties, tree=tree, summary=summary)


def write_retailrocket(
    out_dir: str | Path, config: SyntheticConfig | None = None
) -> SyntheticSummary:
    """Write ``events.csv``, ``item_properties_part1.csv``, ``item_properties_part2.csv`` and
    ``category_tree.csv`` in the Kaggle RetailRocket format.

    Args:
        out_dir (str | Path): folder to write (created if needed; files are overwritten).
        config (SyntheticConfig | None): sizes and behaviour; ``None`` is the 100k-event demo.
            Default: None.

    Returns:
        SyntheticSummary: counts of what was generated, with ``paths`` filled in.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     s = write_retailrocket(d, SyntheticConfig(num_events=300))
        ...     print(open(s.paths["events.csv"]).readline().strip())
        timestamp,visitorid,event,itemid,transactionid
    """
    t0 = time.perf_counter()
    tables = generate(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "events.csv": out / "events.csv",
        "item_properties_part1.csv": out / "item_properties_part1.csv",
        "item_properties_part2.csv": out / "item_properties_part2.csv",
        "category_tree.csv": out / "category_tree.csv",
    }
    tables.events.to_csv(paths["events.csv"], index=False, lineterminator="\n")
    # the real part1 holds a little more than half of the rows
    half = int(round(len(tables.properties) * 0.54))
    tables.properties.iloc[:half].to_csv(
        paths["item_properties_part1.csv"], index=False, lineterminator="\n"
    )
    tables.properties.iloc[half:].to_csv(
        paths["item_properties_part2.csv"], index=False, lineterminator="\n"
    )
    tables.tree.to_csv(paths["category_tree.csv"], index=False, lineterminator="\n")
    tables.summary.paths = paths
    logger.info(
        "wrote synthetic RetailRocket to %s: %d events, %d sessions, %d items, %d categories (%.1fs)",
        out,
        tables.summary.num_events,
        tables.summary.num_sessions,
        tables.summary.num_items,
        tables.summary.num_categories,
        time.perf_counter() - t0,
    )
    return tables.summary


def main(argv: Sequence[str] | None = None) -> SyntheticSummary:
    """Command line: ``python -m torchrec_mamba_preprocessing.synthetic --out DIR [--full]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the four csv files to")
    parser.add_argument(
        "--events", type=int, default=None, help="number of events (default 100000)"
    )
    parser.add_argument("--items", type=int, default=None, help="number of items (default: scaled)")
    parser.add_argument("--categories", type=int, default=None, help="number of categories")
    parser.add_argument(
        "--full", action="store_true", help="the real RetailRocket sizes (2.76M events)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = SyntheticConfig.full(seed=args.seed) if args.full else SyntheticConfig(seed=args.seed)
    if args.events is not None:
        cfg = replace(cfg, num_events=args.events)
    if args.items is not None:
        cfg = replace(cfg, num_items=args.items)
    if args.categories is not None:
        cfg = replace(cfg, num_categories=args.categories)
    t0 = time.perf_counter()
    summary = write_retailrocket(args.out, cfg)
    print(
        f"wrote {summary.num_events} events ({summary.num_sessions} sessions, "
        f"{summary.num_visitors} visitors), {summary.num_items} items, "
        f"{summary.num_categories} categories, {summary.num_property_rows} property rows "
        f"to {args.out} in {time.perf_counter() - t0:.1f}s"
    )
    return summary


if __name__ == "__main__":
    main()
