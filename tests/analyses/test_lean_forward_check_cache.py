"""A passed check of the lean forward is remembered across runs, under a key of everything it depends on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import analyses._lean_forward as lean_forward
from analyses._lean_forward import LeanForward, check_key, remembered_refusal
from runner.models import LoadedModel
from runner.step import StepContext
from tests.helpers import make_model

SHA = "a" * 64


def _context(model: Any, sha256: str | None = SHA) -> StepContext:
    info = {} if sha256 is None else {"sha256": sha256}
    tokenizer: Any = None  # the check reads no tokens
    return StepContext.standalone(model=LoadedModel("m", model, tokenizer, "a test model", info))


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The models :meth:`LeanForward.refusal` really checked."""
    checked: list[Any] = []
    original = LeanForward.refusal

    def refusal(cls: type[LeanForward], model: Any) -> str | None:
        checked.append(model)
        return original(model)

    monkeypatch.setattr(LeanForward, "refusal", classmethod(refusal))
    return checked


def test_a_passed_check_is_not_run_again_for_the_same_weights(tmp_path: Path, checks: list[Any]) -> None:
    model = make_model()
    assert remembered_refusal(_context(model), model, tmp_path) is None
    assert remembered_refusal(_context(model), model, tmp_path) is None  # a later run's context
    assert checks == [model]
    assert len(list((tmp_path / "lean-forward").glob("*.json"))) == 1


def test_other_weights_or_another_config_are_checked(tmp_path: Path, checks: list[Any]) -> None:
    model, wider = make_model(), make_model(d_mlp=128)
    remembered_refusal(_context(model), model, tmp_path)
    remembered_refusal(_context(model, sha256="b" * 64), model, tmp_path)
    remembered_refusal(_context(wider), wider, tmp_path)
    assert checks == [model, model, wider]


def test_a_changed_lean_forward_is_checked(
    tmp_path: Path, checks: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model()
    remembered_refusal(_context(model), model, tmp_path)
    edited = tmp_path / "_lean_forward.py"
    edited.write_text(Path(lean_forward.__file__).read_text() + "\n# an edit\n")
    monkeypatch.setattr(lean_forward, "__file__", str(edited))
    remembered_refusal(_context(model), model, tmp_path)
    assert checks == [model, model]


def test_a_refusal_is_not_remembered(
    tmp_path: Path, checks: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model()
    original = LeanForward._mlp
    monkeypatch.setattr(
        LeanForward, "_mlp", lambda self, layer, x, *rest: original(self, layer, x, *rest) * 1.001
    )
    for _ in range(2):
        refusal = remembered_refusal(_context(model), model, tmp_path)
        assert refusal is not None and "differed from TransformerLens' forward" in refusal
    assert checks == [model, model]
    assert not (tmp_path / "lean-forward").exists()


def test_a_model_of_unknown_weights_is_checked_every_time(tmp_path: Path, checks: list[Any]) -> None:
    model, other = make_model(), make_model()
    assert check_key(_context(model, sha256=None), model) is None
    assert check_key(_context(model), other) is None  # not the case's own model: its weights are unknown
    for _ in range(2):
        assert remembered_refusal(_context(model, sha256=None), model, tmp_path) is None
    assert checks == [model, model]


def test_a_damaged_record_is_checked_again_and_rewritten(tmp_path: Path, checks: list[Any]) -> None:
    model = make_model()
    remembered_refusal(_context(model), model, tmp_path)
    (record,) = (tmp_path / "lean-forward").glob("*.json")
    record.write_text('{"key": "')
    remembered_refusal(_context(model), model, tmp_path)
    remembered_refusal(_context(model), model, tmp_path)
    assert checks == [model, model]
