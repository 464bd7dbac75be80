"""The ranker's feature pipeline, shared by training and serving so both feed the model the same numbers.

It owns the vocabularies (user ids, item ids, tags, user tags; index 0 = unknown, so a cold-start user or item is
scored with the learned "unknown" row instead of failing), the item text embeddings (384-d MiniLM, looked up by item id), and the
encoding of a sample (one user, one target item, the user's history) and of retrieved in-context examples into the
named arrays the model and its ONNX graph take (`SAMPLE_INPUTS`, `EXAMPLE_INPUTS`).

Conventions:
- History: the user's last `history_length` (20) interactions, oldest first, padded at the end; `history_mask` is 1 for a
  real entry. `history_text` is `llmcf.samples.history_vector` of the history items' text embeddings (their normalised
  mean), the same h the vector index holds, so retrieval and features agree.
- History labels: per history entry 2 = the user liked it (label 1), 1 = did not (label 0), 0 = unknown or padding
  (a request may send a history without labels). Examples carry none (0): the pool does not keep its histories' labels.
- User tags are a user's demographic tokens ("gender:F", "age:25", "occupation:10"; `llmcf.movielens`), looked up by
  user id: a user unknown to the vocabulary gets the tags the caller provides (`user_profiles`), else none. A space
  built from a corpus without profiles has no user-tag vocabulary, and models over it no user-tag field
  (`ModelConfig.n_user_tags` 0), as every model saved before profiles existed.
- An item unknown to the vocabulary gets index 0; its text embedding is the one the caller provides (a new item's text,
  embedded with `TextEmbedder`), else zeros; its tags are looked up in the tag vocabulary (unknown tags are dropped).
- Examples come from the example pool (`ranker.retrieval`): their history and target text embeddings are the pool's h
  and t of the sample, so a fresh example about a brand-new item still carries its item's text.

The space is saved beside the ONNX model as `features.json` (vocabularies, sizes) and `features.npz` (embeddings).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmcf.embeddings import EMBEDDING_DIMENSION
from llmcf.samples import history_vector

if TYPE_CHECKING:
    from ranker.sample_pool import ExampleRecord

HISTORY_LENGTH = 20
MAX_TAGS = 6
MAX_USER_TAGS = 3
EXAMPLES = 4
UNKNOWN = 0
FEATURES_JSON = "features.json"
FEATURES_NPZ = "features.npz"


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, numpy dtype, and shape after the batch axis (symbolic names are documented sizes)."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]


SAMPLE_INPUTS: tuple[InputSpec, ...] = (
    InputSpec("user", "int64", ()),
    InputSpec("user_tags", "int64", (MAX_USER_TAGS,)),
    InputSpec("item", "int64", ()),
    InputSpec("item_tags", "int64", (MAX_TAGS,)),
    InputSpec("item_text", "float32", (EMBEDDING_DIMENSION,)),
    InputSpec("history", "int64", (HISTORY_LENGTH,)),
    InputSpec("history_mask", "float32", (HISTORY_LENGTH,)),
    InputSpec("history_label", "int64", (HISTORY_LENGTH,)),
    InputSpec("history_text", "float32", (EMBEDDING_DIMENSION,)),
)
"""The current sample's inputs; every variant's graph takes them, but for the optional fields' inputs
(`USER_TAG_INPUTS`, `HISTORY_LABEL_INPUTS`), which a model without those fields does not take (`model_inputs`)."""

EXAMPLE_INPUTS: tuple[InputSpec, ...] = (
    InputSpec("ex_user", "int64", (EXAMPLES,)),
    InputSpec("ex_user_tags", "int64", (EXAMPLES, MAX_USER_TAGS)),
    InputSpec("ex_item", "int64", (EXAMPLES,)),
    InputSpec("ex_item_tags", "int64", (EXAMPLES, MAX_TAGS)),
    InputSpec("ex_item_text", "float32", (EXAMPLES, EMBEDDING_DIMENSION)),
    InputSpec("ex_history", "int64", (EXAMPLES, HISTORY_LENGTH)),
    InputSpec("ex_history_mask", "float32", (EXAMPLES, HISTORY_LENGTH)),
    InputSpec("ex_history_label", "int64", (EXAMPLES, HISTORY_LENGTH)),
    InputSpec("ex_history_text", "float32", (EXAMPLES, EMBEDDING_DIMENSION)),
    InputSpec("ex_cot", "float32", (EXAMPLES, EMBEDDING_DIMENSION)),
    InputSpec("ex_label", "int64", (EXAMPLES,)),
    InputSpec("ex_cot_ready", "float32", (EXAMPLES,)),
    InputSpec("ex_present", "float32", (EXAMPLES,)),
)
"""The K in-context examples' inputs, only +ICT graphs take them. `ex_present` 0 = no example in that slot (masked out
of attention); `ex_cot_ready` 0 = the example's CoT is still pending (the learned placeholder is used)."""


EXAMPLE_ROW_INPUTS: tuple[InputSpec, ...] = tuple(
    InputSpec(spec.name, spec.dtype, spec.shape[1:]) for spec in EXAMPLE_INPUTS if spec.name != "ex_present"
)
"""One example's inputs (no K axis): what the served example encoder takes per pool sample."""


USER_TAG_INPUTS = frozenset({"user_tags", "ex_user_tags"})
"""The inputs only a model with a user-tag field takes (`ModelConfig.n_user_tags` > 0)."""
HISTORY_LABEL_INPUTS = frozenset({"history_label", "ex_history_label"})
"""The inputs only a model with a liked-history field takes (`ModelConfig.history_labels`)."""
LIKED, NOT_LIKED, UNKNOWN_LABEL = 2, 1, 0


def input_specs(with_examples: bool, with_user_tags: bool = True, with_history_labels: bool = True
                ) -> tuple[InputSpec, ...]:
    return model_inputs(SAMPLE_INPUTS + (EXAMPLE_INPUTS if with_examples else ()), with_user_tags, with_history_labels)


def model_inputs(specs: tuple[InputSpec, ...], with_user_tags: bool, with_history_labels: bool) -> tuple[InputSpec, ...]:
    """`specs` less the optional inputs a model lacks (models saved before those fields existed lack them)."""
    left_out = (frozenset() if with_user_tags else USER_TAG_INPUTS) | (
        frozenset() if with_history_labels else HISTORY_LABEL_INPUTS)
    return tuple(s for s in specs if s.name not in left_out)


def history_label_codes(labels: np.ndarray, present: np.ndarray) -> np.ndarray:
    """0/1 labels -> `LIKED` / `NOT_LIKED` where `present`, `UNKNOWN_LABEL` elsewhere."""
    return np.where(present, np.where(labels > 0, LIKED, NOT_LIKED), UNKNOWN_LABEL).astype(np.int64)


@dataclass(frozen=True)
class NewItem:
    """What serving knows about an item the vocabulary lacks: its text embedding and tags (either may be empty)."""

    text_vector: np.ndarray | None = None
    tags: tuple[str, ...] = ()


@dataclass
class ExamplePool:
    """Encoded examples, one row each (P rows), ready to be gathered into (B, K) example inputs by `gather_examples`."""

    user: np.ndarray  # (P,) int64
    user_tags: np.ndarray  # (P, U) int64
    item: np.ndarray  # (P,) int64
    item_tags: np.ndarray  # (P, T) int64
    item_text: np.ndarray  # (P, 384) float32
    history: np.ndarray  # (P, L) int64
    history_mask: np.ndarray  # (P, L) float32
    history_text: np.ndarray  # (P, 384) float32
    cot: np.ndarray  # (P, 384) float32, zeros where pending
    label: np.ndarray  # (P,) int64
    cot_ready: np.ndarray  # (P,) float32

    def __len__(self) -> int:
        return len(self.user)


class FeatureSpace:
    """Vocabularies and item embeddings; `encode_*` turn ids into model inputs. Build with `build`, persist with
    `save`/`load`."""

    def __init__(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        tags: Sequence[str],
        item_text: np.ndarray,
        item_tags: np.ndarray,
        history_length: int = HISTORY_LENGTH,
        user_tags: Sequence[str] = (),
        user_tag_rows: np.ndarray | None = None,
    ) -> None:
        if item_text.shape != (len(item_ids) + 1, EMBEDDING_DIMENSION):
            raise ValueError(f"item_text must be ({len(item_ids) + 1}, {EMBEDDING_DIMENSION}), got {item_text.shape}")
        if item_tags.shape != (len(item_ids) + 1, MAX_TAGS):
            raise ValueError(f"item_tags must be ({len(item_ids) + 1}, {MAX_TAGS}), got {item_tags.shape}")
        self.user_ids = list(user_ids)
        self.item_ids = list(item_ids)
        self.tags = list(tags)
        self.item_text = np.ascontiguousarray(item_text, dtype=np.float32)
        self.item_tags = np.ascontiguousarray(item_tags, dtype=np.int64)
        self.history_length = history_length
        self.user_tags = list(user_tags)
        rows = np.zeros((len(self.user_ids) + 1, MAX_USER_TAGS), dtype=np.int64) if user_tag_rows is None else user_tag_rows
        if rows.shape != (len(self.user_ids) + 1, MAX_USER_TAGS):
            raise ValueError(f"user_tag_rows must be ({len(self.user_ids) + 1}, {MAX_USER_TAGS}), got {rows.shape}")
        self.user_tag_rows = np.ascontiguousarray(rows, dtype=np.int64)
        self._user_tag_index = {t: i + 1 for i, t in enumerate(self.user_tags)}
        self._user_index = {u: i + 1 for i, u in enumerate(self.user_ids)}
        self._item_index = {it: i + 1 for i, it in enumerate(self.item_ids)}
        self._tag_index = {t: i + 1 for i, t in enumerate(self.tags)}

    @classmethod
    def build(
        cls,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        item_vectors: np.ndarray,
        item_tags: Sequence[Sequence[str]],
        history_length: int = HISTORY_LENGTH,
        user_profiles: Sequence[Sequence[str]] = (),
    ) -> FeatureSpace:
        """A space over these users and items; `item_vectors[i]` / `item_tags[i]` belong to `item_ids[i]`, and
        `user_profiles[u]` (when given) to `user_ids[u]`. Tags are ordered by frequency (ties by name) so the
        vocabulary does not depend on input order."""
        tags = _by_frequency(item_tags)
        tag_index = {t: i + 1 for i, t in enumerate(tags)}
        user_tags = _by_frequency(user_profiles)
        user_tag_index = {t: i + 1 for i, t in enumerate(user_tags)}
        user_tag_rows = np.zeros((len(user_ids) + 1, MAX_USER_TAGS), dtype=np.int64)
        for row, profile in enumerate(user_profiles, start=1):
            user_tag_rows[row] = _tag_row(profile, user_tag_index, MAX_USER_TAGS)
        text = np.zeros((len(item_ids) + 1, EMBEDDING_DIMENSION), dtype=np.float32)
        text[1:] = item_vectors
        tag_rows = np.zeros((len(item_ids) + 1, MAX_TAGS), dtype=np.int64)
        for row, item in enumerate(item_tags, start=1):
            tag_rows[row] = _tag_row(item, tag_index)
        return cls(user_ids, item_ids, tags, text, tag_rows, history_length, user_tags, user_tag_rows)

    # ---- sizes and lookups ----------------------------------------------------------------------------------------

    @property
    def n_users(self) -> int:
        """Rows of the user table, the unknown row 0 included."""
        return len(self.user_ids) + 1

    @property
    def n_items(self) -> int:
        return len(self.item_ids) + 1

    @property
    def n_tags(self) -> int:
        return len(self.tags) + 1

    @property
    def n_user_tags(self) -> int:
        """Rows of the user-tag table, or 0 when the space has no user tags (models over it have no user-tag field)."""
        return len(self.user_tags) + 1 if self.user_tags else 0

    def user_tag_index(self, user_ids: Sequence[str], user_profiles: Mapping[str, Sequence[str]] | None = None
                       ) -> np.ndarray:
        """(B, MAX_USER_TAGS) user-tag indices: the vocabulary's for a known user, else those of the profile given."""
        users = self.user_index(user_ids)
        rows = self.user_tag_rows[users]
        for row, user_id in enumerate(user_ids):
            profile = (user_profiles or {}).get(user_id)
            if users[row] == UNKNOWN and profile is not None:
                rows[row] = _tag_row(profile, self._user_tag_index, MAX_USER_TAGS)
        return rows

    def user_index(self, user_ids: Sequence[str]) -> np.ndarray:
        return np.fromiter((self._user_index.get(u, UNKNOWN) for u in user_ids), dtype=np.int64, count=len(user_ids))

    def item_index(self, item_ids: Sequence[str]) -> np.ndarray:
        return np.fromiter((self._item_index.get(i, UNKNOWN) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def item_vector(self, item_id: str, new_items: Mapping[str, NewItem] | None = None) -> np.ndarray:
        """The item's text embedding: the vocabulary's, else the one provided for a new item, else zeros."""
        index = self._item_index.get(item_id, UNKNOWN)
        if index != UNKNOWN:
            return self.item_text[index]
        new = (new_items or {}).get(item_id)
        if new is not None and new.text_vector is not None:
            return np.asarray(new.text_vector, dtype=np.float32)
        return self.item_text[UNKNOWN]

    def history_indices(self, histories: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(B, L) item indices (last L items, oldest first, padded at the end) and their (B, L) mask."""
        length = self.history_length
        index = np.zeros((len(histories), length), dtype=np.int64)
        mask = np.zeros((len(histories), length), dtype=np.float32)
        for row, history in enumerate(histories):
            recent = list(history)[-length:]
            index[row, : len(recent)] = self.item_index(recent)
            mask[row, : len(recent)] = 1.0
        return index, mask

    # ---- samples --------------------------------------------------------------------------------------------------

    def encode_samples(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        new_items: Mapping[str, NewItem] | None = None,
        user_profiles: Mapping[str, Sequence[str]] | None = None,
        history_labels: Sequence[Sequence[int | None] | None] | None = None,
    ) -> dict[str, np.ndarray]:
        """The `SAMPLE_INPUTS` arrays for B samples given by ids (the serving path). Unknown users and items are
        index 0; `new_items` supplies text and tags for items the vocabulary lacks (targets and history items),
        `user_profiles` the demographic tokens of users it lacks; `history_labels[b]` the 0/1 labels of history b
        (the same length; None = unknown, for the whole history or one entry)."""
        if not len(user_ids) == len(item_ids) == len(histories):
            raise ValueError(f"got {len(user_ids)} users, {len(item_ids)} items and {len(histories)} histories")
        history, history_mask = self.history_indices(histories)
        history_label = np.zeros_like(history)
        for row, (h, labels) in enumerate(zip(histories, history_labels or [None] * len(histories), strict=True)):
            if labels is not None:
                if len(labels) != len(h):
                    raise ValueError(f"history {row} has {len(h)} items and {len(labels)} labels")
                recent = list(labels)[-self.history_length:]
                history_label[row, : len(recent)] = history_label_codes(
                    np.array([label or 0 for label in recent], dtype=np.int64),
                    np.array([label is not None for label in recent], dtype=bool))
        history_text = np.zeros((len(histories), EMBEDDING_DIMENSION), dtype=np.float32)
        for row, h in enumerate(histories):
            if len(h):  # an empty history's h is zeros; a request's candidates carry none (`encode_request`)
                history_text[row] = history_vector(
                    np.array([self.item_vector(i, new_items) for i in list(h)[-self.history_length :]]))
        items = self.item_index(item_ids)
        item_text = np.stack([self.item_vector(i, new_items) for i in item_ids]) if item_ids else history_text[:0]
        item_tags = self.item_tags[items].copy()
        for row, item_id in enumerate(item_ids):
            new = (new_items or {}).get(item_id)
            if items[row] == UNKNOWN and new is not None:
                item_tags[row] = _tag_row(new.tags, self._tag_index)
        return {
            "user": self.user_index(user_ids),
            "user_tags": self.user_tag_index(user_ids, user_profiles),
            "item": items,
            "item_tags": item_tags,
            "item_text": np.ascontiguousarray(item_text, dtype=np.float32),
            "history": history,
            "history_mask": history_mask,
            "history_label": history_label,
            "history_text": np.ascontiguousarray(history_text, dtype=np.float32),
        }

    # ---- examples -------------------------------------------------------------------------------------------------

    def encode_examples(self, records: Sequence[ExampleRecord]) -> ExamplePool:
        """Encode retrieved examples (one row each); their text embeddings come from their stored sample vectors."""
        count = len(records)
        history, history_mask = self.history_indices([r.history for r in records])
        items = self.item_index([r.item_id for r in records])
        cot = np.zeros((count, EMBEDDING_DIMENSION), dtype=np.float32)
        ready = np.zeros(count, dtype=np.float32)
        for row, record in enumerate(records):
            if record.cot is not None:
                cot[row] = record.cot
                ready[row] = 1.0
        empty = np.zeros((0, EMBEDDING_DIMENSION), dtype=np.float32)
        users = self.user_index([r.user_id for r in records])
        return ExamplePool(
            user=users,
            user_tags=self.user_tag_rows[users],
            item=items,
            item_tags=self.item_tags[items],
            item_text=np.stack([r.target_vector for r in records]).astype(np.float32) if count else empty,
            history=history,
            history_mask=history_mask,
            history_text=np.stack([r.history_vector for r in records]).astype(np.float32) if count else empty,
            cot=cot,
            label=np.fromiter((r.label for r in records), dtype=np.int64, count=count),
            cot_ready=ready,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "format": 1,
            "history_length": self.history_length,
            "max_tags": MAX_TAGS,
            "examples": EXAMPLES,
            "text_dimension": EMBEDDING_DIMENSION,
            "user_ids": self.user_ids,
            "item_ids": self.item_ids,
            "tags": self.tags,
            "user_tags": self.user_tags,
        }

    def save(self, directory: Path) -> None:
        """Write `features.json` and `features.npz` into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FEATURES_JSON).write_text(json.dumps(self.to_json()))
        np.savez(directory / FEATURES_NPZ, item_text=self.item_text, item_tags=self.item_tags,
                 user_tag_rows=self.user_tag_rows)

    @classmethod
    def load(cls, directory: Path) -> FeatureSpace:
        meta = json.loads((directory / FEATURES_JSON).read_text())
        if meta.get("format") != 1 or meta["max_tags"] != MAX_TAGS or meta["text_dimension"] != EMBEDDING_DIMENSION:
            raise ValueError(f"{directory / FEATURES_JSON} was written by an incompatible feature pipeline: {meta.get('format')}")
        arrays = np.load(directory / FEATURES_NPZ)
        # Spaces saved before user tags existed have neither: no user tags, as their models have no user-tag field.
        return cls(meta["user_ids"], meta["item_ids"], meta["tags"], arrays["item_text"], arrays["item_tags"],
                   meta["history_length"], meta.get("user_tags", ()),
                   arrays["user_tag_rows"] if "user_tag_rows" in arrays.files else None)


def gather_examples(pool: ExamplePool, slots: np.ndarray) -> dict[str, np.ndarray]:
    """The `EXAMPLE_INPUTS` arrays for (B, K) slots of pool rows; -1 = no example (zeros, `ex_present` 0)."""
    present = slots >= 0
    rows = np.where(present, slots, 0)
    if len(pool) == 0:
        return _empty_examples(slots.shape)
    fields = {
        "ex_user": pool.user[rows],
        "ex_user_tags": pool.user_tags[rows],
        "ex_item": pool.item[rows],
        "ex_item_tags": pool.item_tags[rows],
        "ex_item_text": pool.item_text[rows],
        "ex_history": pool.history[rows],
        "ex_history_mask": pool.history_mask[rows],
        "ex_history_label": np.zeros_like(pool.history[rows]),  # the pool keeps no history labels: unknown
        "ex_history_text": pool.history_text[rows],
        "ex_cot": pool.cot[rows],
        "ex_label": pool.label[rows],
        "ex_cot_ready": pool.cot_ready[rows],
    }
    return absent_as_zeros(fields, present)


def absent_as_zeros(fields: dict[str, np.ndarray], present: np.ndarray) -> dict[str, np.ndarray]:
    """Example input arrays with zeros in every absent slot (so nothing about them depends on which pool row stood in
    for them), plus `ex_present`."""
    out = {}
    for name, values in fields.items():
        mask = present.reshape(present.shape + (1,) * (values.ndim - present.ndim))
        out[name] = np.ascontiguousarray(np.where(mask, values, np.zeros((), dtype=values.dtype)))
    out["ex_present"] = present.astype(np.float32)
    return out


def _empty_examples(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {
        spec.name: np.zeros(shape + tuple(int(s) for s in spec.shape[1:]), dtype=spec.dtype)
        for spec in EXAMPLE_INPUTS
    }


def _by_frequency(tag_lists: Sequence[Sequence[str]]) -> list[str]:
    """Every tag, the most frequent first (ties by name), so a vocabulary does not depend on input order."""
    counts: dict[str, int] = {}
    for tags in tag_lists:
        for tag in tags:
            counts[tag] = counts.get(tag, 0) + 1
    return sorted(counts, key=lambda t: (-counts[t], t))


def _tag_row(tags: Sequence[str], tag_index: Mapping[str, int], width: int = MAX_TAGS) -> np.ndarray:
    known = [tag_index[t] for t in dict.fromkeys(tags) if t in tag_index][:width]
    row = np.zeros(width, dtype=np.int64)
    row[: len(known)] = known
    return row
