"""What the serving tests share: storage filled as the stream pipeline fills it, trained model
versions, and a real uvicorn server on a free port in a thread.

`populate_storage` writes, through the storage API, what the worker and the generator pool would have written for a
MovieLens-100k prefix: the items, their MiniLM embeddings (from the training embedding cache, so nothing is embedded
twice), the interactions, and CoT samples (requests with the user's previous 20 items, completed by the `template`
backend, a deterministic rationale that is NOT an LLM, embedded with MiniLM).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import uvicorn

from llmcf import movielens
from llmcf.cot_policy import cot_request_id
from llmcf.embeddings import MODEL_NAME
from llmcf.events import CotRequest, CotResult, HistoryEntry, InteractionEvent, ItemSnapshot, from_epoch_ms
from llmcf.infra import free_port
from llmcf.settings import Settings
from ranker.data import EmbeddingCache, embedding_cache_path, movielens_corpus, user_histories
from ranker.options import FitOptions, TrainOptions
from ranker.registry import TrainResult
from ranker.serving.app import RankerService, create_app
from ranker.train import train
from storage.repository import Repository

DATASET = "ml-100k"
STORED_INTERACTIONS = 80_000  # the first 80% of ml-100k: the training split, so the trained users have histories


@dataclass(frozen=True)
class Populated:
    """What `populate_storage` wrote: the most active recent user (a stored history of 20), every stored item (in
    order of first appearance), and the CoT sample ids."""

    known_user: str
    known_items: list[str]
    sample_ids: list[str]
    newest_sample_ts: datetime


def train_version(settings: Settings, ict: bool = True, epochs: int = 3, learning_rate: float = 1e-3) -> TrainResult:
    """A small real model on ml-100k (the fast configuration of tests/ranker/test_train.py), registered as 'candidate'.
    The seed is fixed so every version shares one CoT pool and its cached embeddings and retrievals."""
    options = TrainOptions(dataset=DATASET, backbone="deepfm", ict=ict, max_train_samples=4000, max_eval_samples=800,
                           fit=FitOptions(max_epochs=epochs, batch_size=256, learning_rate=learning_rate, seed=0))
    return train(options, settings, log=lambda _line: None)


def populate_storage(repository: Repository, settings: Settings, samples: int = 300) -> Populated:
    corpus = movielens_corpus(DATASET)
    ratings = movielens.load(DATASET)
    window = ratings.window(limit=STORED_INTERACTIONS)
    items, interactions = [], []
    for event in window:
        (interactions if isinstance(event, InteractionEvent) else items).append(event)
    repository.upsert_items(items)
    for start in range(0, len(interactions), 10_000):
        repository.upsert_interactions(interactions[start : start + 10_000])

    cache = EmbeddingCache(embedding_cache_path(settings.home / "cache" / "ranker", "items"))
    vectors = cache.embed(corpus.item_texts)
    repository.upsert_item_embeddings(dict(zip(corpus.item_ids, vectors, strict=True)), model=MODEL_NAME)

    histories, history_labels = user_histories(corpus, 20)
    rows = np.arange(STORED_INTERACTIONS - 8_000, STORED_INTERACTIONS)
    rows = rows[(histories[rows, 0] >= 0)][:: max(1, 8_000 // samples)][:samples]
    requests = [_request(corpus, histories, history_labels, int(row)) for row in rows.tolist()]
    repository.upsert_cot_samples(requests)
    repository.complete_cot_samples(_template_results(requests, settings))
    recent_users = [i.user_id for i in interactions[-4_000:]]
    busiest = max(set(recent_users), key=lambda u: (recent_users.count(u), u))
    return Populated(known_user=busiest, known_items=[i.item_id for i in items],
                     sample_ids=[r.request_id for r in requests], newest_sample_ts=max(r.ts for r in requests))


def _snapshot(corpus, code: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    title, _, text = corpus.item_texts[code].partition("; ")
    return {"item_id": corpus.item_ids[code], "title": title, "text": text, "tags": list(corpus.item_tags[code])}


def _request(corpus, histories: np.ndarray, labels: np.ndarray, row: int) -> CotRequest:  # type: ignore[no-untyped-def]
    user_id, item_id, ts = corpus.user_ids[corpus.user[row]], corpus.item_ids[corpus.item[row]], int(corpus.ts_ms[row])
    interaction = InteractionEvent(user_id=user_id, item_id=item_id, kind="rating", label=int(corpus.label[row]),
                                   ts=from_epoch_ms(ts))
    return CotRequest(
        request_id=cot_request_id(interaction.interaction_id), user_id=user_id, item_id=item_id,
        label=int(corpus.label[row]), ts=from_epoch_ms(ts), target=ItemSnapshot(**_snapshot(corpus, int(corpus.item[row]))),
        history=[HistoryEntry(**_snapshot(corpus, int(code)), label=int(label))
                 for code, label in zip(histories[row], labels[row], strict=True) if code >= 0],
        reason="sampled", requested_at=datetime.now(timezone.utc),
    )


def _template_results(requests: list[CotRequest], settings: Settings) -> list[CotResult]:
    from generators.backends import create_backend
    from generators.prompt import build_prompt

    with create_backend("template") as backend:
        texts = [g.text for g in backend.generate([build_prompt(r, feedback="rating") for r in requests])]
    embeddings = EmbeddingCache(embedding_cache_path(settings.home / "cache" / "ranker", "cot")).embed(texts)
    generated_at = datetime.now(timezone.utc)
    return [
        CotResult(request_id=r.request_id, user_id=r.user_id, item_id=r.item_id, label=r.label, ts=r.ts, cot_text=text,
                  cot_embedding=[float(x) for x in vector], backend="template", model="template", generated_at=generated_at)
        for r, text, vector in zip(requests, texts, embeddings, strict=True)
    ]


@contextmanager
def running_server(service: RankerService, ready_timeout_s: float = 60.0) -> Iterator[str]:
    """A real uvicorn server for `service` on 127.0.0.1:<free port> in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="test-ranker", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the ranker server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
