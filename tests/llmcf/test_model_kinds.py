"""Model kinds: one vocabulary, one parser; the settings and the ranker take theirs from it."""

import pytest

from llmcf.model_kinds import BACKBONES, MODEL_KINDS, ModelKind


def test_every_kind_parses_and_names_itself_back():
    assert MODEL_KINDS == ("deepfm", "deepfm+ict", "din", "din+ict")
    for name in MODEL_KINDS:
        kind = ModelKind.parse(name)
        assert kind.name == str(kind) == name and kind.backbone in BACKBONES
    assert ModelKind.parse("din+ict") == ModelKind("din", True)


@pytest.mark.parametrize("name", ["", "DeepFM", "deepfm+", "ict", "din+ict+ict", "lightgcn"])
def test_anything_else_is_refused_with_the_choices(name):
    with pytest.raises(ValueError, match="one of deepfm, deepfm\\+ict, din, din\\+ict"):
        ModelKind.parse(name)
