from generators.prompt import STEP_BY_STEP, build_prompt, truncate
from tests.generators import HISTORY, make_request


def user_text(prompt) -> str:
    assert [m["role"] for m in prompt.messages] == ["system", "user"]
    return prompt.messages[1]["content"]


def test_prompt_states_the_true_label_and_ends_step_by_step():
    clicked = user_text(build_prompt(make_request(label=1)))
    skipped = user_text(build_prompt(make_request(label=0)))
    assert "The user clicked the target item." in clicked
    assert "The user did not click the target item." in skipped
    assert "The user clicked the target item." not in skipped
    assert clicked.endswith(STEP_BY_STEP) and STEP_BY_STEP == "Let's think step by step."


def test_rating_feedback_says_liked():
    text = user_text(build_prompt(make_request(label=0), feedback="rating"))
    assert "The user did not like the target item." in text
    assert "click" not in text
    assert "+ Toy Story (1995)\n- Heat (1995)\n" in text


def test_history_lines_carry_item_tags_only_in_the_longer_form():
    """The default names history items only (their tags are counted per label in the summary); `history_tags=True`
    writes each item's tags on its line, and the instructions describe whichever form follows them."""
    compact = build_prompt(make_request(), feedback="rating")
    tagged = build_prompt(make_request(), feedback="rating", history_tags=True)
    assert "+ Toy Story (1995)\n" in user_text(compact) and '"+ title" for an item' in compact.instructions
    assert "+ Toy Story (1995) | Animation, Children's, Comedy\n" in user_text(tagged)
    assert '"+ title | tags" for an item' in tagged.instructions
    assert "Frequent tags, liked: " in user_text(compact) and len(user_text(compact)) < len(user_text(tagged))


def test_prompt_has_the_four_parts_history_and_target():
    text = user_text(build_prompt(make_request()))
    for title, _, _ in HISTORY:
        assert title in text
    assert "Title: The Lion King (1994)" in text
    assert "Tags: Animation, Children's, Musical" in text
    assert "flees his kingdom" in text
    assert "Summary: 3 clicked, 2 did not click." in text
    assert "Frequent tags, clicked: Children's 3, Comedy 3, Animation 2" in text
    positions = [text.index(part) for part in ("1. User profile", "2. Target item", "3. Match", "4. Diversity")]
    assert positions == sorted(positions)


def test_instructions_open_the_prompt_and_are_the_same_for_every_request():
    """Backends may compute the instructions once (the transformers backend caches their KV), so they must come first
    and must not depend on the sample; the sample's own data comes after them."""
    first = build_prompt(make_request(label=1))
    other = build_prompt(make_request(label=0, history=[("Fargo (1996)", ["Crime"], 1)], title="Heat (1995)"))
    assert first.instructions == other.instructions
    assert user_text(first).startswith(first.instructions + "\n\n## User history")
    assert "Heat" not in first.instructions and "The user did not click" not in first.instructions
    assert build_prompt(make_request(), feedback="rating").instructions != first.instructions  # "liked", not "clicked"


def test_a_description_that_only_restates_title_and_tags_is_left_out_but_its_year_is_kept():
    movielens_item = make_request(title="Heat", text="Heat (1995); Action, Crime, Thriller", tags=("Action", "Crime", "Thriller"))
    text = user_text(build_prompt(movielens_item))
    assert "Title: Heat (1995)\nTags: Action, Crime, Thriller" in text
    assert "Description" not in text
    described = user_text(build_prompt(make_request(title="Heat", text="Heat (1995); a heist in Los Angeles")))
    assert "Title: Heat\nDescription: Heat (1995); a heist in Los Angeles" in described


def test_history_is_cut_to_the_last_entries_and_texts_are_bounded():
    history = [(f"Movie {i:03d}", ["Drama"], i % 2) for i in range(50)]
    long_text = "word " * 1000
    prompt = build_prompt(make_request(history=history, text=long_text), max_history=20, max_text_chars=300)
    text = user_text(prompt)
    assert "Movie 029" not in text and "Movie 030" in text and "Movie 049" in text
    assert "last 20 of 50 items" in text
    description = next(line for line in text.splitlines() if line.startswith("Description: "))
    assert len(description) <= len("Description: ") + 300
    assert description.endswith("…")
    assert len(text) < 4000


def test_new_user_without_history():
    text = user_text(build_prompt(make_request(history=[])))
    assert "no earlier interactions" in text
    assert text.endswith(STEP_BY_STEP)


def test_as_text_renders_roles_for_completion_endpoints():
    rendered = build_prompt(make_request()).as_text()
    assert rendered.startswith("System: ")
    assert "\n\nUser: " in rendered
    assert rendered.endswith(STEP_BY_STEP + "\n\nAssistant:")


def test_truncate_cuts_at_a_word_boundary():
    assert truncate("short  text\n", 50) == "short text"
    assert truncate("alpha beta gamma delta", 12) == "alpha beta…"
