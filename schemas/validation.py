"""Validation of parsed JSON against ``manifest.schema.json``; the only jsonschema user."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from .errors import MalformedManifest

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator


@cache
def _validator() -> Draft202012Validator:
    # Imported here: jsonschema (with attrs and referencing) is ~55 ms of start-up, paid by the
    # first manifest checked rather than by every command (`otacast status`, the Mender update
    # module's many calls).
    from jsonschema import Draft202012Validator

    text = resources.files(__package__).joinpath("manifest.schema.json").read_text("utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_document() -> dict[str, Any]:
    schema: dict[str, Any] = _validator().schema
    return schema


def validate_envelope(document: Any) -> None:
    """Raise `MalformedManifest` naming the first schema violation.

    Only the first error is computed: collecting them all costs one error object per item of a
    hostile array (tens of seconds for 2 MiB of junk) before any signature has been checked.
    """
    error = next(iter(_validator().iter_errors(document)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        message = error.message
        if len(message) > 160:
            # jsonschema quotes the offending value first and states the rule last ("... is too
            # long"): keep both ends so the reason survives a long value.
            message = message[:60] + " ... " + message[-95:]
        raise MalformedManifest(f"manifest field {where}: {message}")
