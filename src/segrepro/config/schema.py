"""The JSON schema of params/ (workflow/schemas/params.schema.yaml): validation with one-line
errors, and what its $defs share with the code (the comparison heads, the keys of an efficiency
table's machine), so that each is defined once. Torch-free."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jsonschema
import yaml

from segrepro.core.errors import SegreproError

# Under the project root, the working directory of every command, as params/ is
# (segrepro.config.params): the installed package carries no data files.
PARAMS_SCHEMA = Path("workflow/schemas/params.schema.yaml")


def validate(instance: dict, schema: dict, where: str, prefix: str = "") -> None:
    """Validate against a JSON schema; the first error becomes one line naming the key (under
    `prefix`, the instance's own key in its file)."""
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(instance))
    if err is not None:
        key = ".".join([prefix] * bool(prefix) + [str(part) for part in err.absolute_path]) or "(top level)"
        message = err.message
        forbidden = err.validator_value.get("required") if err.validator == "not" and isinstance(
            err.validator_value, dict) else None
        if forbidden:
            # `not: {required: [KEY]}`: a key this kind of spec does not take.
            message = f"{', '.join(repr(k) for k in forbidden)} is not allowed here"
        elif err.validator == "maxItems":
            message = f"{len(err.instance)} items, at most {err.validator_value}"
        elif err.validator == "const":
            message = f"{err.instance!r} given, {err.validator_value!r} expected"
        description = next((schema["description"] for schema in (err.validator_value, err.schema)
                            if isinstance(schema, dict) and "description" in schema), None)
        if description and err.validator in ("not", "maxItems", "const"):
            message += f" ({description})"
        raise SegreproError(f"{where}: {key}: {message}")


@cache
def schema_defs() -> dict:
    """The $defs of workflow/schemas/params.schema.yaml, read once per process."""
    try:
        with open(PARAMS_SCHEMA) as handle:
            return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["$defs"]
    except FileNotFoundError:
        raise SegreproError(f"{PARAMS_SCHEMA}: file not found (run segrepro from the project root)") from None


def schema_enum(name: str) -> tuple:
    """One of the schema's shared enumerations ($defs/NAME: {enum: [...]})."""
    return tuple(schema_defs()[name]["enum"])


def definition(name: str) -> dict:
    """$defs/NAME as a schema of its own (its references resolved against the $defs)."""
    return schema_defs()[name] | {"$defs": schema_defs()}
