"""The LLM-CF chain-of-thought prompt, built from a `CotRequest` alone (generators never read the database).

The paper's prompt has four parts, in this order: (1) a user profile summarised from the interaction history, (2) the target
item's features, (3) how well profile and item match, (4) the user's appetite for diversity; it states the TRUE label, so
the chain of thought is a label-conditioned rationale, and it ends with "Let's think step by step."

The prompt is a pair of chat messages (system + user) so each backend can apply its model's chat template; `Prompt.as_text()`
renders them as plain text for endpoints without one (OpenAI `/v1/completions`). Its size is bounded whatever the request
holds: the history is cut to its last `max_history` entries and every text to `max_text_chars` characters.

History lines name the items only ("+ title"); the profile's tags are given per label as counts beside them. The earlier
form, each line with its item's tags (`history_tags=True`), is ~40% more of each request's own prompt tokens, which a
CPU generator prefills one by one (`python -m bench.generators --drafts` measures both forms side by side).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from llmcf.events import CotRequest, HistoryEntry, ItemSnapshot

FeedbackKind = Literal["click", "rating"]
"""How a label was obtained: a click (1 = clicked) or a rating turned into a label (1 = liked, e.g. MovieLens rating >= 4)."""

STEP_BY_STEP = "Let's think step by step."

SYSTEM_MESSAGE = (
    "You are a recommender-system analyst. You explain a user's known reaction to a target item. Be concrete: cite the "
    "user's items and the item's features."
)

DEFAULT_MAX_HISTORY = 20
DEFAULT_MAX_TEXT_CHARS = 300
_MAX_TITLE_CHARS = 120
_MAX_TAGS = 8
_TOP_TAGS = 5


@dataclass(frozen=True)
class LabelWording:
    """The words for a label's two outcomes: `positive` / `negative` are past-tense verb phrases ("clicked")."""

    positive: str
    negative: str

    def verb(self, label: int) -> str:
        return self.positive if label == 1 else self.negative


WORDINGS: dict[FeedbackKind, LabelWording] = {
    "click": LabelWording(positive="clicked", negative="did not click"),
    "rating": LabelWording(positive="liked", negative="did not like"),
}


@dataclass(frozen=True)
class Prompt:
    """One request's prompt: the chat messages plus the request, which the template backend and the candidate scorer read.

    `instructions` is the leading part of the user message, identical for every request with the same wording: a backend
    may compute it once and reuse it (the transformers backend keeps its KV cache).
    """

    request: CotRequest
    messages: tuple[dict[str, str], ...]
    wording: LabelWording
    instructions: str

    @property
    def label_statement(self) -> str:
        """The sentence that states the true label, e.g. "The user clicked the target item."."""
        return f"The user {self.wording.verb(self.request.label)} the target item."

    def as_text(self) -> str:
        """The messages as one plain-text prompt, for completion endpoints that apply no chat template."""
        parts = [f"{m['role'].capitalize()}: {m['content']}" for m in self.messages]
        return "\n\n".join(parts) + "\n\nAssistant:"


def instructions(wording: LabelWording, history_tags: bool = False) -> str:
    """The fixed task text that opens every user message: the four parts to reason through and how history lines read."""
    line = "title | tags" if history_tags else "title"
    return (
        "Explain why the user reacted to the target item as they did. The reaction is known and must not be questioned.\n"
        "Reason in four parts:\n"
        f"1. User profile: the user's tastes from the history (what they {wording.positive} and what they "
        f"{wording.negative}).\n"
        "2. Target item: its main features.\n"
        "3. Match: how well the profile and the target item fit.\n"
        "4. Diversity: does the user seek variety or stay with familiar kinds of items?\n"
        f'History lines, oldest first, read "+ {line}" for an item the user {wording.positive} and '
        f'"- {line}" for one they {wording.negative}.'
    )


def build_prompt(
    request: CotRequest,
    *,
    feedback: FeedbackKind = "click",
    max_history: int = DEFAULT_MAX_HISTORY,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    history_tags: bool = False,
) -> Prompt:
    """Build the LLM-CF prompt for one labelled sample; `feedback` picks the label's words (clicked vs liked);
    `history_tags` writes each history item's tags on its line (the earlier, longer form).

    The history is taken to be in time order (oldest first), as the streams stage keeps it; its last `max_history` entries
    are shown. The fixed instructions come first, so every prompt with the same wording starts with the same text; the
    sample follows: history (one compact line per item, then the profile summary), target item, the known outcome, and
    "Let's think step by step." last.
    """
    if max_history < 1:
        raise ValueError("max_history must be at least 1")
    wording = WORDINGS[feedback]
    history = list(request.history)[-max_history:]
    label_statement = f"The user {wording.verb(request.label)} the target item."
    fixed = instructions(wording, history_tags)
    sections = [
        fixed,
        _history_section(history, len(request.history), wording, history_tags),
        _target_section(request.target, max_text_chars),
        f"## Known outcome\n{label_statement} Conclude consistently with it.",
        STEP_BY_STEP,
    ]
    messages = (
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": "\n\n".join(sections)},
    )
    return Prompt(request=request, messages=messages, wording=wording, instructions=fixed)


def _history_section(history: list[HistoryEntry], total: int, wording: LabelWording, tags: bool) -> str:
    if not history:
        return "## User history\nThe user has no earlier interactions (a new user)."
    shown = f"last {len(history)} of {total}" if total > len(history) else f"{len(history)}"
    lines = [f"## User history ({shown} items)"]
    lines.extend(f"{'+' if entry.label == 1 else '-'} {_item_line(entry, tags)}" for entry in history)
    liked = [e for e in history if e.label == 1]
    disliked = [e for e in history if e.label == 0]
    lines.append(f"Summary: {len(liked)} {wording.positive}, {len(disliked)} {wording.negative}.")
    liked_tags = top_tags(liked)
    if liked_tags:
        lines.append(f"Frequent tags, {wording.positive}: {_tag_counts(liked_tags)}.")
    disliked_tags = top_tags(disliked)
    if disliked_tags:
        lines.append(f"Frequent tags, {wording.negative}: {_tag_counts(disliked_tags)}.")
    return "\n".join(lines)


def _target_section(target: ItemSnapshot, max_text_chars: int) -> str:
    title = truncate(target.title, _MAX_TITLE_CHARS)
    description = target.text.strip()
    year = _year_if_only_restated(description, target.title, target.tags) if description else None
    lines = ["## Target item", f"Title: {title} {year}".rstrip() if year is not None else f"Title: {title}"]
    if description and year is None:
        lines.append(f"Description: {truncate(description, max_text_chars)}")
    if target.tags:
        lines.append(f"Tags: {', '.join(target.tags[:_MAX_TAGS])}")
    return "\n".join(lines)


def _year_if_only_restated(description: str, title: str, tags: list[str]) -> str | None:
    """When a description says nothing beyond the title, the tags and a year (MovieLens items' text is
    "Title (1995); Genre, Genre"), that year ("(1995)", or "" without one): the title line carries it and the
    description is left out, as repeating it costs prompt tokens for no information. None when it says more."""
    rest = description.replace(title, " ", 1) if title else description
    for tag in tags:
        rest = rest.replace(tag, " ")
    years = re.findall(r"\(\d{4}\)", rest)
    if len(years) > 1 or re.sub(r"\(\d{4}\)|[\s;,.:|/-]", "", rest):
        return None
    return years[0] if years else ""


def _item_line(item: ItemSnapshot, tags: bool) -> str:
    title = truncate(item.title, _MAX_TITLE_CHARS)
    return f"{title} | {', '.join(item.tags[:_MAX_TAGS])}" if tags and item.tags else title


def top_tags(items: list[HistoryEntry], limit: int = _TOP_TAGS) -> list[tuple[str, int]]:
    """The most frequent tags over `items`, most frequent first, ties in first-seen order (deterministic)."""
    counts = Counter(tag for item in items for tag in dict.fromkeys(item.tags))
    return counts.most_common(limit)


def _tag_counts(tags: list[tuple[str, int]]) -> str:
    return ", ".join(f"{tag} {count}" for tag, count in tags)


def truncate(text: str, max_chars: int) -> str:
    """`text` on one line, cut to at most `max_chars` characters at a word boundary, with an ellipsis when cut."""
    flat = " ".join(text.split())
    if len(flat) <= max_chars:
        return flat
    cut = flat[: max_chars - 1]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut + "…"
