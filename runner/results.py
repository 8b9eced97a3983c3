"""Typed step results: what an analysis computes, in a form that round-trips through files.

Every analysis declares a result model, a subclass of :class:`StepResult`. Its JSON form (arrays
left out) is the case's *summary*: expectations read it, the manifest and the report show it. Its
arrays (fields typed :data:`Array`, or containers of them) are stored beside it in an NPZ file.
Later steps read earlier results through ``ctx.outputs(step_id, ResultType)`` as they were reloaded
from those files, so a result read from the run folder (or a cache) is the same as a fresh one.

This module imports no numpy until an array is actually seen, so params and result models load
quickly for ``runner validate``.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import PurePath
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    SerializationInfo,
    ValidationInfo,
    WrapValidator,
)
from pydantic.json_schema import WithJsonSchema

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ARRAY_REF",
    "Array",
    "JSONValue",
    "StepResult",
    "dump_result",
    "load_result",
    "result_bytes",
    "result_from_files",
    "to_jsonable",
]

R = TypeVar("R", bound="StepResult")

ARRAY_REF = "$array"
"""Key of the placeholder that stands for an array in a result's JSON form."""


def to_jsonable(value: Any) -> Any:
    """Numpy scalars and arrays, tuples, sets and paths → plain JSON values; non-finite floats → str.

    Non-finite floats become ``"nan"`` / ``"inf"`` / ``"-inf"`` so that JSON files stay standard.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_jsonable(v) for v in value]
    if type(value).__module__ == "numpy":  # arrays and numpy scalars, without importing numpy
        return to_jsonable(value.tolist() if hasattr(value, "tolist") else value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, PurePath):
        return str(value)
    return value


JSONValue = Annotated[Any, BeforeValidator(to_jsonable)]
"""A loosely structured JSON value (nested dicts and lists), normalised by :func:`to_jsonable`."""


def _to_array(value: Any, handler: Any, info: ValidationInfo) -> Any:
    """Accept a numpy array, a torch tensor, a nested list, or a placeholder with its NPZ store."""
    import numpy as np

    if isinstance(value, dict) and ARRAY_REF in value:
        store = (info.context or {}).get("arrays")
        if store is None or value[ARRAY_REF] not in store:
            raise ValueError(f"array {value[ARRAY_REF]!r} is not in the result's array file")
        return np.asarray(store[value[ARRAY_REF]])
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy dtype, float32 holds it exactly
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise ValueError("an Array field holds numbers, not Python objects")
    return array


def _array_json(value: np.ndarray, info: SerializationInfo) -> Any:
    """In JSON: a placeholder, the array itself going to the NPZ store passed as context."""
    if info.mode != "json":
        return value
    store = (info.context or {}).get("arrays")
    ref: dict[str, Any] = {"shape": list(value.shape), "dtype": str(value.dtype)}
    if store is not None:
        key = f"a{len(store)}"
        store[key] = value
        ref = {ARRAY_REF: key, **ref}
    return ref


Array = Annotated[
    Any,
    WrapValidator(_to_array),
    PlainSerializer(_array_json),
    WithJsonSchema({"type": "object", "description": "an n-dimensional array, stored in NPZ"}),
]
"""A numpy array field (torch tensors are converted). Stored in the result's NPZ file, not in JSON."""


class StepResult(BaseModel):
    """Base class of analysis results: frozen, no unknown fields, JSON + NPZ round trip.

    Subclass it with the fields a later step, an expectation or the report reads; give each a
    docstring. Keep files meant for people (CSV tables, plots) in ``StepOutput.data`` instead.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, ser_json_inf_nan="strings"
    )

    def summary(self) -> dict[str, Any]:
        """The JSON form with arrays shown as ``{"shape": ..., "dtype": ...}``: what expectations read."""
        return dict(json.loads(self.model_dump_json()))

    def __eq__(self, other: object) -> bool:
        """Equal type, equal JSON form, and arrays equal in dtype, shape and every element."""
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, StepResult)
        (mine, my_arrays), (theirs, their_arrays) = dump_result(self), dump_result(other)
        return mine == theirs and all(_same_array(my_arrays[k], their_arrays[k]) for k in my_arrays)

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside


def _same_array(a: Any, b: Any) -> bool:
    import numpy as np

    return bool(a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def dump_result(result: StepResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """``result`` as (JSON-able dict, arrays by key); :func:`load_result` inverts it exactly."""
    arrays: dict[str, Any] = {}
    data = json.loads(result.model_dump_json(context={"arrays": arrays}))
    return data, arrays


def load_result(model: type[R], data: dict[str, Any], arrays: Any = None) -> R:
    """Rebuild a result of type ``model`` from :func:`dump_result`'s two parts."""
    return model.model_validate(data, context={"arrays": arrays if arrays is not None else {}})


def result_bytes(result: StepResult) -> tuple[bytes, bytes | None]:
    """``result`` as the bytes of its JSON file and of its NPZ file (None without arrays)."""
    import numpy as np

    data, arrays = dump_result(result)
    text = json.dumps(data, indent=1, allow_nan=False).encode() + b"\n"
    if not arrays:
        return text, None
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # uncompressed: results are read back by the next step right away
    return text, buffer.getvalue()


def result_from_files(model: type[R], json_bytes: bytes, npz_bytes: bytes | None) -> R:
    """Inverse of :func:`result_bytes`."""
    arrays: dict[str, Any] = {}
    if npz_bytes is not None:
        import numpy as np

        with np.load(io.BytesIO(npz_bytes), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    return load_result(model, json.loads(json_bytes), arrays)
