"""Fills a database the way the stream worker and the generator pool do, through the storage API: MovieLens-100k
items and interactions in event-time order, and CoT samples for the interactions the worker's own policy picks, with
template rationales (recorded as backend `template`, never as LLM output) embedded by the real MiniLM embedder."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from llmcf import movielens
from llmcf.cot_policy import CotPolicy, cot_request_id
from llmcf.embeddings import TextEmbedder
from llmcf.events import CotRequest, CotResult, InteractionEvent, ItemEvent, ItemSnapshot
from storage.repository import Repository

POLICY = CotPolicy(rate=0.1, cold_start_window_s=86_400)
_embedder: TextEmbedder | None = None


def replay_into(database_url: str, low: int, high: int) -> tuple[int, int]:
    """Store MovieLens-100k ratings [low, high) (time order) with their items and the CoT samples the worker would
    request, all generated. Returns (interactions, CoT samples) written."""
    global _embedder
    ratings = movielens.load("ml-100k")
    rated = np.unique(ratings.item_codes[low:high])
    earlier = rated[ratings.first_rating[rated] < low]
    window = movielens.Window(ratings, low, high, earlier[np.argsort(ratings.first_rating[earlier], kind="stable")], len(rated))
    items: dict[str, ItemEvent] = {}
    interactions: list[InteractionEvent] = []
    for event in window:
        if isinstance(event, ItemEvent):
            items[event.item_id] = event
        else:
            interactions.append(event)
    now = datetime.now(timezone.utc)
    requests = []
    for event in interactions:
        item = items.get(event.item_id)
        created = item.created_at if item is not None else event.ts
        if POLICY.reason(event.interaction_id, int(event.ts.timestamp() * 1000), int(created.timestamp() * 1000)) is None:
            continue
        title = item.title if item is not None else event.item_id
        requests.append(CotRequest(
            request_id=cot_request_id(event.interaction_id), user_id=event.user_id, item_id=event.item_id,
            label=event.label, ts=event.ts, target=ItemSnapshot(item_id=event.item_id, title=title), requested_at=now,
        ))
    texts = [f"[template rationale] user {r.user_id} {'liked' if r.label else 'did not like'} {r.target.title}"
             for r in requests]
    _embedder = _embedder or TextEmbedder.load()
    vectors = _embedder.embed(texts) if texts else np.zeros((0, 384), dtype=np.float32)
    results = [
        CotResult(request_id=r.request_id, user_id=r.user_id, item_id=r.item_id, label=r.label, ts=r.ts, cot_text=text,
                  cot_embedding=[float(x) for x in vector], backend="template", model="template", generated_at=now)
        for r, text, vector in zip(requests, texts, vectors, strict=True)
    ]
    with Repository.from_url(database_url) as repository:
        repository.upsert_items(list(items.values()))
        repository.upsert_interactions(interactions)
        repository.upsert_cot_samples(requests)
        repository.complete_cot_samples(results)
    return len(interactions), len(requests)
