"""Tests of the generator pool's model side: prompt, backends. `make_request` builds CotRequests for them."""

from __future__ import annotations

from datetime import UTC, datetime

from llmcf.events import CotRequest, HistoryEntry, ItemSnapshot

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

HISTORY = [
    ("Toy Story (1995)", ["Animation", "Children's", "Comedy"], 1),
    ("Heat (1995)", ["Action", "Crime", "Thriller"], 0),
    ("Babe (1995)", ["Children's", "Comedy", "Drama"], 1),
    ("Casino (1995)", ["Drama", "Thriller"], 0),
    ("Aladdin (1992)", ["Animation", "Children's", "Comedy", "Musical"], 1),
]


def make_request(
    label: int = 1,
    *,
    request_id: str = "r1",
    history: list[tuple[str, list[str], int]] | None = None,
    title: str = "The Lion King (1994)",
    text: str = "A young lion prince flees his kingdom after his father's murder.",
    tags: tuple[str, ...] = ("Animation", "Children's", "Musical"),
    requested_at: datetime = NOW,
) -> CotRequest:
    entries = [
        HistoryEntry(item_id=f"h{i}", title=t, tags=list(g), label=lab)
        for i, (t, g, lab) in enumerate(HISTORY if history is None else history)
    ]
    return CotRequest(
        request_id=request_id,
        user_id="u1",
        item_id="target",
        label=label,
        ts=NOW,
        requested_at=requested_at,
        target=ItemSnapshot(item_id="target", title=title, text=text, tags=list(tags)),
        history=entries,
    )
