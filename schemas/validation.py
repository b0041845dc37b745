"""Validation of parsed JSON against ``manifest.schema.json``; the only jsonschema user."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

from .errors import MalformedManifest


@cache
def _validator() -> Draft202012Validator:
    text = resources.files(__package__).joinpath("manifest.schema.json").read_text("utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_document() -> dict[str, Any]:
    schema: dict[str, Any] = _validator().schema
    return schema


def validate_envelope(document: Any) -> None:
    """Raise `MalformedManifest` naming the first schema violation (deterministic order)."""
    errors = sorted(
        _validator().iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if errors:
        error = errors[0]
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        message = error.message
        if len(message) > 160:
            message = message[:157] + "..."
        raise MalformedManifest(f"manifest field {where}: {message}")
