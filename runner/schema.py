"""The JSON Schema of spec files, with each analysis' params schema attached to its steps.

Editors (VS Code's YAML extension) use it to complete and check ``params`` per analysis.
"""

from __future__ import annotations

from typing import Any

from runner.registry import ANALYSES
from runner.spec import ExperimentSpec

__all__ = ["spec_json_schema"]


def spec_json_schema() -> dict[str, Any]:
    """ExperimentSpec's schema; ``steps[].params`` is typed by the step's ``analysis``."""
    schema = ExperimentSpec.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.setdefault("$defs", {})
    step = defs["StepSpec"]
    step["properties"]["analysis"]["enum"] = ANALYSES.names()
    branches = []
    for name in ANALYSES.names():
        params_model = ANALYSES.get(name).params_model
        params_schema = params_model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(params_schema.pop("$defs", {}))
        defs[params_model.__name__] = params_schema
        branches.append(
            {
                "if": {"properties": {"analysis": {"const": name}}, "required": ["analysis"]},
                "then": {"properties": {"params": {"$ref": f"#/$defs/{params_model.__name__}"}}},
            }
        )
    step["allOf"] = branches
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "runner experiment spec"
    return schema
