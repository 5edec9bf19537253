"""Why a filtered search came back empty: the filter values no item of the index has.

A filter that matches nothing gives no results, as it should; but "nothing similar" and "no
such group" look the same in an empty list. When a search finds nothing and one of its
filters (kind, group, source, tag) names only values no live item has, the response's
``note`` says so, and for a group given as a video's file name without its folders it names
the group meant (a video's group is its id, the path under the corpus).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lookalike.index.filtered import live_matches
from lookalike.index.searcher import ItemIndex

# (field of the query echo, items column it filters)
FILTER_COLUMNS = (("kind", "kind"), ("group", "group"), ("source", "source"), ("tag", "tags"))
MAX_SUGGESTIONS = 3


def empty_result_note(index: ItemIndex, query: Mapping[str, Any]) -> str | None:
    """For a search that found nothing: which filter values of ``query`` (a ``QueryEcho``) no
    live item of ``index`` has, when all of a filter's values are such; None otherwise (each
    filter matches some item: nothing passes them together, or nothing is left)."""
    reasons = []
    for field, column in FILTER_COLUMNS:
        given = query.get(field)
        if given is None:
            continue
        values = list(given) if isinstance(given, (list, tuple)) else [given]
        if len(live_matches(index, {column: set(values)})[1]):  # one look (cached), as the search's own filter
            continue
        reason = f"no item has {field} " + " or ".join(repr(v) for v in values)
        if field == "group":
            reason += _group_hint(index, values)
        reasons.append(reason)
    return "; ".join(reasons) or None


def _group_hint(index: ItemIndex, values: Sequence[str]) -> str:
    """Groups that end with one of ``values`` after a folder (a video named without its path)."""
    groups, by_name = live_groups(index)
    if not groups:
        return " (a group is a video's id, and this index holds no video frames)"
    meant = sorted({g for v in values for g in by_name.get(v.rsplit("/", 1)[-1], ()) if g.endswith("/" + v.lstrip("/"))})
    if meant:
        shown = ", ".join(repr(g) for g in meant[:MAX_SUGGESTIONS]) + (", ..." if len(meant) > MAX_SUGGESTIONS else "")
        return f" (a group is a video's id, its path in the corpus: did you mean {shown}?)"
    return f" (a group is a video's id, its path in the corpus, such as {groups[0]!r})"


def live_groups(index: ItemIndex) -> tuple[list[str], dict[str, list[str]]]:
    """The sorted distinct groups of the live items, and them by file name (the part after
    the last "/"), kept with the index until it changes (a note may be asked for on every
    request, and a million items take a tenth of a second)."""
    state = (len(index.items), index.num_deleted)
    cached = index.__dict__.get("_live_groups")
    if cached is None or cached[0] != state:
        groups = sorted(str(g) for g in index.items.distinct_values("group", index.live_mask()[: len(index.items)]))
        by_name: dict[str, list[str]] = {}
        for g in groups:
            by_name.setdefault(g.rsplit("/", 1)[-1], []).append(g)
        cached = (state, groups, by_name)
        index.__dict__["_live_groups"] = cached
    return cached[1], cached[2]
