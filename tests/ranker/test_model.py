"""The ICT module's shapes and masking, and ONNX parity for the four variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ranker.export import (
    PARITY_TOLERANCE,
    ParityError,
    check_parity,
    check_split_parity,
    export_onnx,
    export_split,
    onnx_session,
    parity,
    random_inputs,
    split_scores,
    worst_parity,
)
from ranker.model import ModelConfig, RankerModel

torch.set_num_threads(1)
VARIANTS = [("deepfm", False), ("deepfm", True), ("din", False), ("din", True)]


def make_model(backbone: str = "deepfm", ict: bool = True, seed: int = 0, n_user_tags: int = 0,
               history_labels: bool = False) -> RankerModel:
    torch.manual_seed(seed)
    return RankerModel(ModelConfig(backbone, ict, n_users=50, n_items=40, n_tags=8,  # type: ignore[arg-type]
                                   n_user_tags=n_user_tags, history_labels=history_labels)).eval()


def tensors(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in inputs.items()}


def scores(model: RankerModel, inputs: dict[str, np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        return model(tensors(inputs)).logit


def ict_hidden(model: RankerModel, inputs: dict[str, np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(tensors(inputs)).ict_hidden
    assert hidden is not None
    return hidden


@pytest.mark.parametrize("backbone,ict", VARIANTS)
def test_every_variant_scores_a_batch(backbone: str, ict: bool) -> None:
    model = make_model(backbone, ict)
    inputs = random_inputs(model.config, batch=7, seed=1)

    output = model(tensors(inputs))
    total, bce, reconstruction = model.loss(tensors(inputs), torch.ones(7))

    assert output.logit.shape == (7,)
    assert torch.isfinite(output.logit).all()
    assert (output.ict_hidden.shape == (7, 13, 32)) if ict else output.ict_hidden is None
    assert total.item() == pytest.approx(bce.item() + reconstruction.item(), rel=1e-6)
    assert (reconstruction.item() > 0) == ict


def test_causal_mask_a_later_token_cannot_change_an_earlier_position() -> None:
    model = make_model()
    inputs = random_inputs(model.config, batch=5, seed=2)
    inputs["ex_present"][:] = 1.0
    changed = {k: v.copy() for k, v in inputs.items()}
    changed["ex_label"][:, 2] = 1 - changed["ex_label"][:, 2]  # example 2's label token sits at position 8

    before, after = ict_hidden(model, inputs), ict_hidden(model, changed)

    torch.testing.assert_close(before[:, :8], after[:, :8], rtol=0, atol=0)
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_a_missing_example_cannot_influence_the_output() -> None:
    model = make_model()
    inputs = random_inputs(model.config, batch=6, seed=3)
    inputs["ex_present"][:] = 1.0
    inputs["ex_present"][:, 1] = 0.0
    noise = random_inputs(model.config, batch=6, seed=4)
    changed = {k: v.copy() for k, v in inputs.items()}
    for name in [n for n in inputs if n.startswith("ex_") and n != "ex_present"]:
        changed[name][:, 1] = noise[name][:, 1]  # everything about the missing example

    torch.testing.assert_close(scores(model, inputs), scores(model, changed), rtol=0, atol=0)
    present = {k: v.copy() for k, v in changed.items()}
    present["ex_present"][:, 1] = 1.0
    assert not torch.allclose(scores(model, inputs), scores(model, present))


def test_a_pending_example_uses_the_learned_placeholder_and_is_left_out_of_the_reconstruction() -> None:
    model = make_model()
    inputs = random_inputs(model.config, batch=4, seed=5)
    inputs["ex_present"][:] = 1.0
    inputs["ex_cot_ready"][:] = 1.0
    inputs["ex_cot_ready"][:, 3] = 0.0
    changed = {k: v.copy() for k, v in inputs.items()}
    changed["ex_cot"][:, 3] = random_inputs(model.config, batch=4, seed=6)["ex_cot"][:, 3]

    torch.testing.assert_close(scores(model, inputs), scores(model, changed), rtol=0, atol=0)
    assert model.ict is not None
    with torch.no_grad():
        tokens = model.example_tokens(tensors(inputs))
    assert tokens.shape == (4, 4, 3, 32)  # (batch, examples, [feature, CoT, label], d)
    torch.testing.assert_close(tokens[:, 3, 1], model.ict.cot_placeholder.detach().expand(4, -1))

    none_ready = {k: v.copy() for k, v in inputs.items()}
    none_ready["ex_cot_ready"][:] = 0.0
    assert model.loss(tensors(none_ready), torch.ones(4))[2].item() == 0.0


def test_reconstruction_gradient_reaches_the_decoder() -> None:
    model = make_model().train()
    inputs = random_inputs(model.config, batch=8, seed=7)
    _, _, reconstruction = model.loss(tensors(inputs), torch.ones(8))
    reconstruction.backward()
    assert model.ict is not None and model.ict.layers[0].qkv.weight.grad is not None
    assert model.ict.layers[0].qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone,ict", VARIANTS)
@pytest.mark.parametrize("optional_fields", [False, True])
def test_onnx_matches_torch(backbone: str, ict: bool, optional_fields: bool, tmp_path: Path) -> None:
    n_user_tags = 6 if optional_fields else 0
    model = make_model(backbone, ict, seed=8, n_user_tags=n_user_tags, history_labels=optional_fields)
    path = export_onnx(model, tmp_path / "model.onnx")
    session = onnx_session(path)

    names = [i.name for i in session.get_inputs()]
    assert names == model.config.input_names
    for name in ("user_tags", "history_label"):  # a model without the optional fields takes the inputs it always took
        assert (name in names) == optional_fields and (f"ex_{name}" in names) == (optional_fields and ict)
    assert [o.name for o in session.get_outputs()] == ["score"]
    for batch, seed in ((1, 20), (100, 21), (1000, 22)):
        assert parity(model, session, random_inputs(model.config, batch, seed)) <= PARITY_TOLERANCE
    assert check_parity(model, path, []) <= PARITY_TOLERANCE


def test_an_artifact_that_is_not_the_model_fails_the_parity_check(tmp_path: Path) -> None:
    path = export_onnx(make_model(seed=8), tmp_path / "model.onnx")
    other = make_model(seed=9)
    worst = worst_parity(other, path, [])
    assert worst > PARITY_TOLERANCE
    with pytest.raises(ParityError, match="onnxruntime and torch differ"):
        check_parity(other, path, [])


@pytest.mark.parametrize("backbone,n_user_tags", [("deepfm", 0), ("din", 0), ("deepfm", 6)])
def test_the_split_graphs_give_the_full_graphs_scores(backbone: str, n_user_tags: int, tmp_path: Path) -> None:
    model = make_model(backbone, True, seed=10, n_user_tags=n_user_tags, history_labels=n_user_tags > 0)
    full = onnx_session(export_onnx(model, tmp_path / "model.onnx"))
    examples_path, scorer_path = export_split(model, tmp_path)
    examples, scorer = onnx_session(examples_path), onnx_session(scorer_path)

    for batch, seed in ((1, 30), (100, 31), (700, 32)):
        inputs = random_inputs(model.config, batch, seed)  # absent examples and pending CoTs among them
        whole = full.run(["score"], {n: inputs[n] for n in model.config.input_names})[0]
        np.testing.assert_allclose(split_scores(examples, scorer, inputs), whole, rtol=0, atol=1e-5)
    assert check_split_parity(model, examples_path, scorer_path, []) <= PARITY_TOLERANCE
    with pytest.raises(ParityError, match="split graphs"):
        check_split_parity(make_model(backbone, True, seed=11, n_user_tags=n_user_tags, history_labels=n_user_tags > 0),
                           examples_path, scorer_path, [])


@pytest.mark.parametrize("name", ["user_tags", "history_label"])
def test_an_optional_input_changes_the_score_only_of_a_model_with_its_field(name: str) -> None:
    inputs = random_inputs(make_model(n_user_tags=6, history_labels=True).config, 16, seed=40)
    other = dict(inputs, **{name: np.roll(inputs[name], 1, axis=0)})
    field = {"n_user_tags": 6} if name == "user_tags" else {"history_labels": True}
    with_field, without = make_model(seed=12, **field), make_model(seed=12)  # type: ignore[arg-type]
    assert not torch.allclose(scores(with_field, inputs), scores(with_field, other))
    torch.testing.assert_close(scores(without, inputs), scores(without, other))
