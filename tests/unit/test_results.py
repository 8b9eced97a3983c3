"""Typed step results: the JSON + NPZ round trip the run folder and later steps rely on."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from runner.results import (
    Array,
    JSONValue,
    StepResult,
    dump_result,
    load_result,
    result_bytes,
    result_from_files,
)


class Layer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    loss: float
    top: list[int]


class Example(StepResult):
    name: str
    ratio: float
    layers: dict[int, Layer]
    vectors: dict[int, Array]
    matrix: Array | None = None
    extra: JSONValue = None


def example() -> Example:
    return Example(
        name="x",
        ratio=float("nan"),
        layers={3: Layer(loss=0.5, top=[1, 2])},
        vectors={3: np.arange(4, dtype=np.float64), 7: np.ones((2, 2), dtype=np.float16)},
        matrix=torch.eye(3, dtype=torch.bfloat16),
        extra={"count": np.int64(3), "values": (np.float32(0.25), float("inf"))},
    )


def test_a_result_survives_its_files_exactly() -> None:
    result = example()
    again = result_from_files(Example, *result_bytes(result))
    assert again == result
    assert again.vectors[7].dtype == np.float16 and again.vectors[3].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert math.isnan(again.ratio) and again.layers[3].top == [1, 2]


def test_bfloat16_tensors_become_float32_arrays_holding_the_same_values() -> None:
    matrix = example().matrix
    assert matrix.dtype == np.float32 and matrix.tolist() == np.eye(3).tolist()


def test_loose_values_are_plain_json_and_nonfinite_floats_strings() -> None:
    assert example().extra == {"count": 3, "values": [0.25, "inf"]}


def test_summary_is_json_with_arrays_as_shapes() -> None:
    summary = example().summary()
    json.dumps(summary, allow_nan=False)
    assert summary["ratio"] == "NaN"  # strict JSON has no NaN
    assert summary["layers"] == {"3": {"loss": 0.5, "top": [1, 2]}}
    assert summary["vectors"]["7"] == {"shape": [2, 2], "dtype": "float16"}
    assert summary["matrix"] == {"shape": [3, 3], "dtype": "float32"}


def test_arrays_go_to_the_npz_store_and_json_keeps_references() -> None:
    data, arrays = dump_result(example())
    assert data["vectors"]["3"] == {"$array": "a0", "shape": [4], "dtype": "float64"}
    assert sorted(arrays) == ["a0", "a1", "a2"]


def test_results_differing_in_one_array_element_are_not_equal() -> None:
    changed = example().vectors[3].copy()
    changed[2] = 2.5
    other = example().model_copy(update={"vectors": {**example().vectors, 3: changed}})
    assert other != example()


def test_a_reference_to_a_missing_array_is_refused() -> None:
    data, _ = dump_result(example())
    with pytest.raises(ValidationError, match="array 'a0' is not in the result's array file"):
        load_result(Example, data, {})


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Example.model_validate({**dump_result(example())[0], "surprise": 1}, context={"arrays": {}})


def test_an_array_field_refuses_python_objects() -> None:
    with pytest.raises(ValidationError, match="holds numbers, not Python objects"):
        Example(name="x", ratio=1.0, layers={}, vectors={0: [{"a": 1}]})
