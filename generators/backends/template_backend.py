"""The template backend: a deterministic rationale assembled from the request's own data. It is NOT a language model.

Why it exists: load tests and CI need the whole pipeline to run at broker speed without a model, and a new deployment needs
something that works before a GPU is there. Its text always starts with `TEMPLATE_MARKER`, its `model` is "template-v1",
and its backend name is "template", so its output can never be mistaken for an LLM's (filter on `CotResult.backend`).

The text follows the prompt's four parts: the profile (liked / not-liked counts, frequent tags), the target's tags, the
match (the target's tags found among liked vs not-liked history items), the appetite for diversity (the share of distinct
tags in the history), then the true label. Same request, same text, in any process.
"""

from __future__ import annotations

from collections.abc import Sequence

from generators.backends.base import CotBackend, Generation, GenerationOptions
from generators.prompt import Prompt, top_tags, truncate

TEMPLATE_MARKER = "[template rationale]"
_BROAD_TASTE_SHARE = 0.5


class TemplateBackend(CotBackend):
    """Deterministic, label-consistent rationales; `completion_tokens` counts whitespace-separated words (no tokenizer),
    `prompt_tokens` is 0 (no prompt is read)."""

    name = "template"

    def __init__(self, *, options: GenerationOptions | None = None, max_batch: int = 1024):
        self.model = "template-v1"
        self.options = options or GenerationOptions()
        self.max_batch = max_batch

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        generations = []
        for prompt in prompts:
            text = template_rationale(prompt)
            generations.append(Generation(text=text, prompt_tokens=0, completion_tokens=len(text.split())))
        return generations


def template_rationale(prompt: Prompt) -> str:
    """The rationale for one prompt's request, built only from its data and its true label."""
    request = prompt.request
    wording = prompt.wording
    history = list(request.history)[-20:]
    liked = [e for e in history if e.label == 1]
    disliked = [e for e in history if e.label == 0]
    target = request.target
    title = truncate(target.title, 120)

    if history:
        liked_tags = top_tags(liked, limit=3)
        taste = ", ".join(tag for tag, _ in liked_tags) or "no recurring tags"
        profile = (
            f"1. Profile: over the last {len(history)} interactions the user {wording.positive} {len(liked)} "
            f"and {wording.negative} {len(disliked)} items; the items {wording.positive} are mostly: {taste}."
        )
    else:
        profile = "1. Profile: the user has no earlier interactions (a new user), so nothing is known of their tastes."

    target_tags = list(dict.fromkeys(target.tags))
    item = f'2. Target item: "{title}"' + (
        f", tagged {', '.join(target_tags[:8])}." if target_tags else ", with no tags."
    )

    liked_tag_set = {t for e in liked for t in e.tags}
    disliked_tag_set = {t for e in disliked for t in e.tags}
    in_liked = [t for t in target_tags if t in liked_tag_set]
    in_disliked = [t for t in target_tags if t in disliked_tag_set]
    if target_tags and history:
        match = (
            f"3. Match: {len(in_liked)} of the target's {len(target_tags)} tags appear among items the user "
            f"{wording.positive} ({', '.join(in_liked) or 'none'}) and {len(in_disliked)} among items the user "
            f"{wording.negative} ({', '.join(in_disliked) or 'none'})."
        )
    else:
        match = "3. Match: there is not enough data to compare the profile with the target item."

    all_tags = [t for e in history for t in e.tags]
    if all_tags:
        share = len(set(all_tags)) / len(all_tags)
        kind = (
            "a broad taste: the user explores varied items"
            if share >= _BROAD_TASTE_SHARE
            else "a narrow taste: the user stays with familiar kinds of items"
        )
        diversity = (
            f"4. Diversity: the history holds {len(set(all_tags))} distinct tags out of {len(all_tags)} "
            f"tag mentions ({share:.0%}), {kind}."
        )
    else:
        diversity = "4. Diversity: the history carries no tags, so the appetite for diversity is unknown."

    outcome = f'Outcome: the user {wording.verb(request.label)} "{title}"'
    if request.label == 1:
        outcome += (
            ", in line with the tags the user already favours."
            if len(in_liked) > len(in_disliked)
            else ", which points to curiosity beyond the usual profile."
        )
    else:
        outcome += (
            ", in line with the tags the user turned away from before."
            if len(in_disliked) >= len(in_liked) and in_disliked
            else ", so this item did not fit the user's interests despite the profile."
        )
    return " ".join([TEMPLATE_MARKER, profile, item, match, diversity, outcome])
