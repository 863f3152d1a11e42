"""The pieces of the synthetic RetailRocket generator (see :mod:`~torchrec_mamba_preprocessing.synthetic`).

A :class:`Catalogue` is the fixed world (category tree, items, popularity, successors, siblings);
:func:`walk_sessions` moves every session one position at a time, all sessions at once;
:func:`place_in_time` gives visitors and timestamps; :func:`item_properties` writes the weekly
property snapshots. Every function draws from the one ``numpy.random.Generator`` it is given, in a
fixed order, so a seed fixes the output byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .synthetic import SyntheticConfig

__all__ = [
    "EVENT_NAMES",
    "Catalogue",
    "build_catalogue",
    "session_lengths",
    "walk_sessions",
    "place_in_time",
    "events_frame",
    "item_properties",
    "tree_frame",
]

DAY_MS = 86_400_000
MINUTE_MS = 60_000
VIEW, CART, TRANSACTION = 0, 1, 2
EVENT_NAMES = np.array(["view", "addtocart", "transaction"])


@dataclass
class Catalogue:
    """Category tree, items and the lookup tables the walk samples from.

    Nodes of the tree are indexed ``0..C-1`` (roots, then level 2, then level 3); ``leaves`` are
    the item-bearing nodes and "leaf" below means an index into ``leaves``. Items are ``0..I-1``.

    Args:
        parent (np.ndarray): ``(C,)`` parent node, -1 for roots.
        leaves (np.ndarray): ``(Lf,)`` node index of each leaf.
        cat_ids (np.ndarray): ``(C,)`` public categoryid of each node.
        item_leaf (np.ndarray): ``(I,)`` leaf of each item.
        item_weight (np.ndarray): ``(I,)`` Zipf popularity weight.
        item_ids (np.ndarray): ``(I,)`` public itemid.
        by_leaf (np.ndarray): ``(I,)`` items sorted by leaf.
        leaf_start (np.ndarray): ``(Lf,)`` first position of each leaf in ``by_leaf``.
        leaf_end (np.ndarray): ``(Lf,)`` one past the last position.
        cum_in_leaf (np.ndarray): ``(I,)`` per-leaf cumulative popularity, leaf ``f`` in
            ``(f, f + 1]``, so one ``searchsorted`` samples many leaves at once.
        succ (np.ndarray): ``(I, K)`` likely successors of each item (same leaf, never itself).
        succ_cum (np.ndarray): ``(K,)`` cumulative probability of picking successor ``k``.
        by_parent (np.ndarray): ``(Lf,)`` leaves sorted by parent.
        leaf_pos (np.ndarray): ``(Lf,)`` position of each leaf in ``by_parent``.
        sib_start (np.ndarray): ``(Lf,)`` first position of a leaf's sibling group in ``by_parent``.
        sib_count (np.ndarray): ``(Lf,)`` size of that group (the leaf included).
        leaf_pop_cum (np.ndarray): ``(Lf,)`` cumulative popularity of the leaves.
        item_pop_cum (np.ndarray): ``(I,)`` cumulative popularity of the items.
    """

    parent: np.ndarray
    leaves: np.ndarray
    cat_ids: np.ndarray
    item_leaf: np.ndarray
    item_weight: np.ndarray
    item_ids: np.ndarray
    by_leaf: np.ndarray
    leaf_start: np.ndarray
    leaf_end: np.ndarray
    cum_in_leaf: np.ndarray
    succ: np.ndarray
    succ_cum: np.ndarray
    by_parent: np.ndarray
    leaf_pos: np.ndarray
    sib_start: np.ndarray
    sib_count: np.ndarray
    leaf_pop_cum: np.ndarray
    item_pop_cum: np.ndarray

    def sample_in_leaf(self, leaf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``leaf``, by popularity within that leaf."""
        pos = np.searchsorted(self.cum_in_leaf, leaf + rng.random(len(leaf)), side="right")
        pos = np.clip(pos, self.leaf_start[leaf], self.leaf_end[leaf] - 1)
        return self.by_leaf[pos]


def _build_tree(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Parent node (-1 for roots) of every node; nodes ordered root, level 2, level 3."""
    n, r = int(cfg.num_categories or 0), int(cfg.num_roots or 0)
    n2 = min(n - r, max(r, round(math.sqrt(n * r))))
    n3 = n - r - n2
    parent = np.full(n, -1, dtype=np.int64)
    # every root gets at least one child; the rest pick a random parent
    p2 = np.concatenate([np.arange(r), rng.integers(0, r, max(0, n2 - r))])[:n2]
    parent[r : r + n2] = rng.permutation(p2)
    if n3 > 0:
        parent[r + n2 :] = r + rng.integers(0, n2, n3)
    return parent


def build_catalogue(cfg: SyntheticConfig, rng: np.random.Generator) -> Catalogue:
    """Draw the tree, the items, their popularity and their successors."""
    n_items, n_cat = int(cfg.num_items or 0), int(cfg.num_categories or 0)
    parent = _build_tree(cfg, rng)
    has_child = np.zeros(n_cat, dtype=bool)
    has_child[parent[parent >= 0]] = True
    leaves = np.flatnonzero(~has_child)
    n_leaves = len(leaves)
    cat_ids = np.sort(rng.choice(int(n_cat * 1.02) + 2, n_cat, replace=False))
    cat_ids = rng.permutation(cat_ids)  # node -> public categoryid (no structure in the ids)

    # items: every leaf gets one, the rest follow lognormal leaf weights; Zipf popularity
    leaf_weight = rng.lognormal(0.0, 1.0, n_leaves)
    extra = rng.choice(n_leaves, n_items - n_leaves, p=leaf_weight / leaf_weight.sum())
    item_leaf = rng.permutation(np.concatenate([np.arange(n_leaves), extra]))
    item_weight = (rng.permutation(n_items) + 1).astype(np.float64) ** -cfg.zipf_exponent
    item_ids = rng.choice(int(n_items * 1.12) + 2, n_items, replace=False)

    by_leaf = np.argsort(item_leaf, kind="stable")
    leaf_sorted = item_leaf[by_leaf]
    leaf_start = np.searchsorted(leaf_sorted, np.arange(n_leaves), side="left")
    leaf_end = np.searchsorted(leaf_sorted, np.arange(n_leaves), side="right")
    cw = np.cumsum(item_weight[by_leaf])
    base = np.concatenate([[0.0], cw])[leaf_start]  # (Lf,) weight before each leaf
    total = cw[leaf_end - 1] - base  # (Lf,)
    cum_in_leaf = leaf_sorted + (cw - base[leaf_sorted]) / total[leaf_sorted]

    leaf_parent = parent[leaves]
    by_parent = np.argsort(leaf_parent, kind="stable")
    lp_sorted = leaf_parent[by_parent]
    leaf_pos = np.empty(n_leaves, dtype=np.int64)
    leaf_pos[by_parent] = np.arange(n_leaves)
    sib_start = np.searchsorted(lp_sorted, leaf_parent, side="left")
    sib_count = np.searchsorted(lp_sorted, leaf_parent, side="right") - sib_start
    leaf_pop = np.bincount(item_leaf, weights=item_weight, minlength=n_leaves)

    k = cfg.num_successors
    succ_p = np.array(([0.6, 0.25, 0.15] + [0.1] * max(0, k - 3))[:k], dtype=np.float64)
    cat = Catalogue(
        parent=parent,
        leaves=leaves,
        cat_ids=cat_ids,
        item_leaf=item_leaf,
        item_weight=item_weight,
        item_ids=item_ids,
        by_leaf=by_leaf,
        leaf_start=leaf_start,
        leaf_end=leaf_end,
        cum_in_leaf=cum_in_leaf,
        succ=np.empty((n_items, k), dtype=np.int64),
        succ_cum=np.cumsum(succ_p / succ_p.sum()),
        by_parent=by_parent,
        leaf_pos=leaf_pos,
        sib_start=sib_start,
        sib_count=sib_count,
        leaf_pop_cum=np.cumsum(leaf_pop / leaf_pop.sum()),
        item_pop_cum=np.cumsum(item_weight / item_weight.sum()),
    )
    # successors: likely next items in the same leaf (a Markov chain); a self-successor becomes
    # the next item of the same leaf (wrapping inside the leaf)
    pos = np.empty(n_items, dtype=np.int64)
    pos[by_leaf] = np.arange(n_items)
    for j in range(k):
        s = cat.sample_in_leaf(item_leaf, rng)
        same = s == np.arange(n_items)
        nxt = pos[s] + 1
        wrap = nxt >= leaf_end[item_leaf]
        nxt[wrap] = leaf_start[item_leaf][wrap]
        s[same] = by_leaf[nxt[same]]
        cat.succ[:, j] = s
    return cat


def session_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Session lengths summing to exactly ``num_events`` (a share of them single events)."""
    n_target = cfg.num_events
    multi = cfg.mean_session_length
    mean_len = cfg.single_event_fraction + (1 - cfg.single_event_fraction) * multi
    n_draw = int(n_target / mean_len * 1.2) + 16
    lengths = np.empty(0, dtype=np.int64)
    while lengths.sum() < n_target:
        single = rng.random(n_draw) < cfg.single_event_fraction
        extra = rng.geometric(1.0 / max(multi - 1.0, 1.0 + 1e-9), n_draw)  # >= 1
        lengths = np.concatenate(
            [lengths, np.where(single, 1, 1 + extra).clip(1, cfg.max_session_length)]
        )
    cut = int(np.searchsorted(np.cumsum(lengths), n_target))
    lengths = lengths[: cut + 1].copy()
    lengths[-1] -= int(lengths.sum()) - n_target
    return lengths


def walk_sessions(
    cfg: SyntheticConfig, cat: Catalogue, lengths: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Walk all sessions in parallel, one position at a time.

    Returns:
        tuple[np.ndarray, np.ndarray, np.ndarray]: item, event type and gap to the previous event
        (ms, 0 at a session start) of every event, sessions concatenated.
    """
    n_events, n_sess, n_items = int(lengths.sum()), len(lengths), len(cat.item_leaf)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ev_item = np.empty(n_events, dtype=np.int64)
    ev_type = np.zeros(n_events, dtype=np.int64)
    ev_gap_ms = np.zeros(n_events, dtype=np.int64)
    cur_item = np.searchsorted(cat.item_pop_cum, rng.random(n_sess), side="right")
    cur_item = cur_item.clip(0, n_items - 1)
    cur_leaf = cat.item_leaf[cur_item]
    last_type = np.zeros(n_sess, dtype=np.int64)
    ev_item[offsets[:-1]] = cur_item
    active = np.arange(n_sess)
    p1 = cfg.p_repeat
    p2 = p1 + cfg.p_successor
    p3 = p2 + cfg.p_same_category
    k = cat.succ.shape[1]
    for t in range(1, int(lengths.max())):
        active = active[lengths[active] > t]
        if len(active) == 0:
            break
        m = len(active)
        item, leaf, prev = cur_item[active], cur_leaf[active], last_type[active]
        r = rng.random(m)
        new_type = np.zeros(m, dtype=np.int64)
        new_item = item.copy()
        # after add-to-cart: often the transaction of the same item
        buy = (prev == CART) & (rng.random(m) < cfg.p_transaction)
        new_type[buy] = TRANSACTION
        free = ~buy
        # a repeat view of the current item, the only way to an add-to-cart
        rep = free & (r < p1)
        new_type[rep & (rng.random(m) < cfg.p_cart)] = CART
        suc = free & (r >= p1) & (r < p2)
        pick = np.searchsorted(cat.succ_cum, rng.random(int(suc.sum())), side="right")
        new_item[suc] = cat.succ[item[suc], pick.clip(0, k - 1)]
        same = free & (r >= p2) & (r < p3)
        if same.any():
            new_item[same] = cat.sample_in_leaf(leaf[same], rng)
        drift = free & (r >= p3)
        if drift.any():  # to a sibling leaf mostly, else anywhere by popularity
            dl = leaf[drift]
            to_sib = (rng.random(len(dl)) < cfg.p_sibling) & (cat.sib_count[dl] > 1)
            offset = rng.integers(0, 1 << 30, len(dl)) % cat.sib_count[dl]
            sib = cat.by_parent[cat.sib_start[dl] + offset]
            anyl = np.searchsorted(cat.leaf_pop_cum, rng.random(len(dl)), side="right")
            dl = np.where(to_sib, sib, anyl.clip(0, len(cat.leaves) - 1))
            new_item[drift] = cat.sample_in_leaf(dl, rng)
        pos = offsets[active] + t
        ev_item[pos] = new_item
        ev_type[pos] = new_type
        # gaps: seconds to minutes, never above 25 minutes; a purchase follows its cart quickly
        gap = np.exp(rng.normal(math.log(45_000.0), 1.0, m))
        gap = np.where(buy, gap * 0.3, gap)
        ev_gap_ms[pos] = np.clip(gap, 1_000, 25 * MINUTE_MS).astype(np.int64)
        cur_item[active] = new_item
        cur_leaf[active] = cat.item_leaf[new_item]
        last_type[active] = new_type
    return ev_item, ev_type, ev_gap_ms


def place_in_time(
    cfg: SyntheticConfig, lengths: np.ndarray, ev_gap_ms: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """Visitors and timestamps: a visitor's sessions are more than 31 minutes apart.

    Returns:
        tuple[np.ndarray, np.ndarray, int]: timestamp (ms) and public visitorid of every event,
        and the number of visitors.
    """
    n_sess = len(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    p_more = 1.0 - 1.0 / cfg.mean_sessions_per_visitor
    per_visitor = np.empty(0, dtype=np.int64)
    while per_visitor.sum() < n_sess:
        per_visitor = np.concatenate([per_visitor, rng.geometric(1.0 - p_more, n_sess // 2 + 8)])
    vcut = int(np.searchsorted(np.cumsum(per_visitor), n_sess))
    per_visitor = per_visitor[: vcut + 1].copy()
    per_visitor[-1] -= int(per_visitor.sum()) - n_sess
    n_vis = len(per_visitor)
    sess_visitor = np.repeat(np.arange(n_vis), per_visitor)  # consecutive sessions per visitor
    within_ms = np.cumsum(ev_gap_ms)
    sess_dur = within_ms[offsets[1:] - 1] - within_ms[offsets[:-1]]
    # next session of the visitor: this one's duration + more than 31 minutes + ~2 days
    pause = (31 * MINUTE_MS + rng.exponential(2 * DAY_MS, n_sess)).astype(np.int64)
    first_of_visitor = np.concatenate([[0], np.cumsum(per_visitor)[:-1]])
    cum_step = np.concatenate([[0], np.cumsum(sess_dur + pause)[:-1]])
    rel_start = cum_step - cum_step[first_of_visitor][sess_visitor]
    last_of_visitor = first_of_visitor + per_visitor - 1
    span = rel_start[last_of_visitor] + sess_dur[last_of_visitor]
    horizon = cfg.num_days * DAY_MS
    base = (rng.random(n_vis) * np.maximum(horizon - span, 0)).astype(np.int64)
    sess_start = cfg.start_ms + base[sess_visitor] + rel_start + rng.integers(0, 1000, n_sess)
    sess_of_event = np.repeat(np.arange(n_sess), lengths)
    ev_ts = sess_start[sess_of_event] + within_ms - within_ms[offsets[:-1]][sess_of_event]
    visitor_ids = rng.choice(int(n_vis * 1.05) + 2, n_vis, replace=False)
    return ev_ts, visitor_ids[sess_visitor[sess_of_event]], n_vis


def events_frame(
    ev_ts: np.ndarray, ev_visitor: np.ndarray, ev_type: np.ndarray, item_ids: np.ndarray
) -> pd.DataFrame:
    """``events.csv`` rows sorted by time; transaction ids increase with time."""
    n = len(ev_ts)
    order = np.lexsort((np.arange(n), ev_ts))
    is_tr = ev_type[order] == TRANSACTION
    trans_id = np.zeros(n, dtype=np.int64)
    trans_id[is_tr] = np.arange(int(is_tr.sum()))
    return pd.DataFrame(
        {
            "timestamp": ev_ts[order],
            "visitorid": ev_visitor[order],
            "event": EVENT_NAMES[ev_type[order]],
            "itemid": item_ids[order],
            "transactionid": pd.arrays.IntegerArray(trans_id, ~is_tr),
        }
    )


def item_properties(
    cfg: SyntheticConfig, cat: Catalogue, rng: np.random.Generator
) -> tuple[pd.DataFrame, int]:
    """Weekly property snapshots: categoryid (some late, some changing), available, 790, 888.

    Returns:
        tuple[pd.DataFrame, int]: rows in file order, and the number of items whose category
        changes.
    """
    n_items = len(cat.item_leaf)
    weeks = max(1, cfg.num_days // 7 + 1)
    snapshots = cfg.start_ms + 3 * 3_600_000 + DAY_MS * 7 * np.arange(weeks)
    n_snap = len(snapshots)
    categorised = rng.random(n_items) >= cfg.uncategorised_fraction
    late = rng.random(n_items) < cfg.late_category_fraction
    first_snap = np.minimum(np.where(late, rng.integers(1, 3, n_items), 0), n_snap - 1)
    item_cat = cat.cat_ids[cat.leaves[cat.item_leaf]]
    cat_items = np.flatnonzero(categorised)
    cat_value = item_cat[cat_items].astype(str).astype(object)
    rows: list[tuple[np.ndarray, np.ndarray, str, np.ndarray]] = [
        (snapshots[first_snap[cat_items]], cat_items, "categoryid", cat_value)
    ]
    # a re-categorisation to a sibling leaf at a later snapshot
    change = cat_items[rng.random(len(cat_items)) < cfg.category_change_fraction]
    change = change[first_snap[change] < n_snap - 1]
    if len(change):
        later = rng.integers(0, 1 << 30, len(change)) % (n_snap - 1 - first_snap[change])
        cl = cat.item_leaf[change]
        shift = 1 + rng.integers(0, 1 << 30, len(change)) % np.maximum(cat.sib_count[cl] - 1, 1)
        rank = (cat.leaf_pos[cl] - cat.sib_start[cl] + shift) % cat.sib_count[cl]
        new_leaf = np.where(
            cat.sib_count[cl] > 1,
            cat.by_parent[cat.sib_start[cl] + rank],
            (cl + 1) % len(cat.leaves),
        )
        new_value = cat.cat_ids[cat.leaves[new_leaf]].astype(str).astype(object)
        rows.append((snapshots[first_snap[change] + 1 + later], change, "categoryid", new_value))
    # an unchanged repeat of the first categoryid row for some items (real snapshots repeat values)
    rep = cat_items[rng.random(len(cat_items)) < 0.1]
    rep = rep[first_snap[rep] < n_snap - 1]
    if len(rep):
        value = cat_value[np.searchsorted(cat_items, rep)]
        rows.append((snapshots[first_snap[rep] + 1], rep, "categoryid", value))
    # ignored properties: availability flags and hashed numeric properties
    av_items = np.repeat(np.arange(n_items), 1 + (rng.random(n_items) < 0.5))
    av_ts = snapshots[rng.integers(0, n_snap, len(av_items))]
    av_value = rng.integers(0, 2, len(av_items)).astype(str).astype(object)
    rows.append((av_ts, av_items, "available", av_value))
    price = (np.round(rng.lognormal(8.0, 1.0, n_items) / 12) * 12).astype(np.int64)
    price_ts = snapshots[rng.integers(0, n_snap, n_items)]
    price_value = np.char.add(np.char.add("n", price.astype(str)), ".000").astype(object)
    rows.append((price_ts, np.arange(n_items), "790", price_value))
    h1, h2 = rng.integers(100_000, 999_999, n_items), rng.integers(100, 99_999, n_items)
    hash_ts = snapshots[rng.integers(0, n_snap, n_items)]
    hash_value = np.char.add(np.char.add(h1.astype(str), " "), h2.astype(str)).astype(object)
    rows.append((hash_ts, np.arange(n_items), "888", hash_value))

    items = np.concatenate([r[1] for r in rows])
    perm = rng.permutation(len(items))
    frame = pd.DataFrame(
        {
            "timestamp": np.concatenate([r[0] for r in rows])[perm],
            "itemid": cat.item_ids[items][perm],
            "property": np.concatenate([np.full(len(r[1]), r[2], dtype=object) for r in rows])[
                perm
            ],
            "value": np.concatenate([r[3] for r in rows])[perm],
        }
    )
    return frame, len(change)


def tree_frame(cat: Catalogue, rng: np.random.Generator) -> pd.DataFrame:
    """``category_tree.csv`` rows in random order; roots have an empty parentid."""
    perm = rng.permutation(len(cat.parent))
    parent = cat.parent[perm]
    parent_ids = np.where(parent >= 0, cat.cat_ids[np.maximum(parent, 0)], 0)
    return pd.DataFrame(
        {
            "categoryid": cat.cat_ids[perm],
            "parentid": pd.arrays.IntegerArray(parent_ids, parent < 0),
        }
    )
