"""Best-of-n selection among a prompt's sampled candidates: `heuristic_rationale_score`, a cheap stand-in for the
paper's candidate judge, and `pick_best_candidate`, which keeps the candidate it scores highest."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from generators.backends.base import BackendError

if TYPE_CHECKING:
    from generators.prompt import Prompt

_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"[.!?)\"']\s*$")
_MIN_WORDS, _MAX_WORDS = 30, 400


def heuristic_rationale_score(prompt: Prompt, text: str) -> float:
    """A cheap stand-in for the paper's candidate judge: the mean of four proxies in [0, 1], equal weights.

    - relevance: share of the target title's words (3+ letters) that the text mentions;
    - consistency: the text states the true label's direction (e.g. "clicked") and not the opposite ("did not click");
    - completeness: length within 30-400 words, and the last sentence finished (not cut by the token limit);
    - coherence: share of distinct word trigrams (repetition loops score low).
    It is a heuristic, not a model of quality: it only ranks candidates of the same prompt.
    """
    lowered = text.lower()
    words = _WORD.findall(lowered)
    title_words = {w for w in _WORD.findall(prompt.request.target.title.lower()) if len(w) >= 3 and not w.isdigit()}
    relevance = len(title_words & set(words)) / len(title_words) if title_words else 1.0

    label = prompt.request.label
    right = _mentions(lowered, prompt.wording.verb(label))
    wrong = _mentions(lowered, prompt.wording.verb(1 - label))
    consistency = {(True, False): 1.0, (False, False): 0.5, (True, True): 0.25, (False, True): 0.0}[(right, wrong)]

    length_ok = min(1.0, len(words) / _MIN_WORDS) if len(words) < _MAX_WORDS else _MAX_WORDS / len(words)
    completeness = 0.5 * length_ok + 0.5 * (1.0 if _SENTENCE_END.search(text) else 0.0)

    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    coherence = len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    return (relevance + consistency + completeness + coherence) / 4


def pick_best_candidate(prompt: Prompt, candidates: Sequence[str]) -> str:
    """The candidate with the highest `heuristic_rationale_score` (the first one on ties)."""
    if not candidates:
        raise BackendError("no candidate to choose from")
    return max(candidates, key=lambda text: heuristic_rationale_score(prompt, text))


def _mentions(lowered: str, verb_phrase: str) -> bool:
    """Whether `lowered` states `verb_phrase` ("clicked" / "did not click"): a negated phrase also matches "didn't click",
    "not click", "never click"; a positive verb preceded by "not"/"never" is the opposite statement and does not match."""
    if verb_phrase.startswith("did not "):
        stem = re.escape(verb_phrase.removeprefix("did not "))
        return re.search(rf"(\bnot|n't|\bnever) {stem}", lowered) is not None
    return re.search(rf"(?<!not )(?<!never )\b{re.escape(verb_phrase)}\b", lowered) is not None
