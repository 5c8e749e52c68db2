"""A small validator for the OpenAPI 3.1 schema subset WAHA's spec uses (request bodies the sandbox
refuses with 400 exactly as WAHA's NestJS ValidationPipe would)."""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


class SchemaValidator:
    """A small validator for the OpenAPI 3.1 schema subset WAHA's spec uses.

    Why not jsonschema: it is not a dependency, and WAHA's spec has quirks a strict validator gets
    wrong (``type: object`` with a string default for mimetype, ``required: true`` on a property,
    ``nullable``). Messages mimic class-validator, which WAHA's NestJS ValidationPipe uses.
    """

    def __init__(self, schemas: dict[str, Json]) -> None:
        self.schemas = schemas

    def validate(self, name: str, value: Any, *, allow_null: bool = False) -> list[str]:
        """Problems found in ``value`` against component ``name``; empty when valid.

        ``allow_null`` accepts null anywhere (for checking responses, where WAHA itself sends null
        for absent fields the spec marks required)."""
        errors: list[str] = []
        self._check({"$ref": f"#/components/schemas/{name}"}, value, "", errors, allow_null)
        return errors

    def _resolve(self, schema: Json) -> Json:
        while "$ref" in schema:
            schema = self.schemas[schema["$ref"].rsplit("/", 1)[-1]]
        return schema

    @staticmethod
    def _is_type(value: Any, t: str) -> bool:
        if t == "string":
            return isinstance(value, str)
        if t == "boolean":
            return isinstance(value, bool)
        if t == "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        if t == "number":
            return isinstance(value, int | float) and not isinstance(value, bool)
        if t == "object":
            return isinstance(value, dict)
        if t == "array":
            return isinstance(value, list)
        if t == "null":
            return value is None
        return True

    def _check(self, schema: Json, value: Any, path: str, errors: list[str], allow_null: bool) -> None:
        schema = self._resolve(schema)
        label = path or "body"
        for sub in schema.get("allOf", []):
            self._check(sub, value, path, errors, allow_null)
        for key in ("oneOf", "anyOf"):
            if key not in schema:
                continue
            results: list[list[str]] = []
            for sub in schema[key]:
                sub_errors: list[str] = []
                self._check(sub, value, path, sub_errors, allow_null)
                results.append(sub_errors)
            matches = sum(1 for r in results if not r)
            if (key == "anyOf" and matches == 0) or (key == "oneOf" and matches != 1):
                if matches == 0:
                    closest: list[str] = min(results, key=len)
                    errors.extend(closest)
                else:
                    errors.append(f"{label} must match exactly one schema in oneOf")
        if value is None and (allow_null or schema.get("nullable")):
            return
        declared = schema.get("type")
        if declared is not None:
            types = list(declared) if isinstance(declared, list) else [declared]
            default = schema.get("default")
            if "object" in types and default is not None and not isinstance(default, dict):
                # Spec quirk: NestJS swagger emits `type: object` for string fields with a default
                # (e.g. voice/video mimetype); WAHA itself accepts the default's type.
                types.append({str: "string", bool: "boolean"}.get(type(default), "number"))
            if not any(self._is_type(value, t) for t in types):
                article = "an" if types[0][0] in "aeiou" else "a"
                errors.append(f"{label} must be {article} {types[0]}")
                return
        if "enum" in schema and value not in schema["enum"]:
            allowed = ", ".join(str(v) for v in schema["enum"])
            errors.append(f"{label} must be one of the following values: {allowed}")
        if isinstance(value, dict):
            required = schema.get("required")
            required = required if isinstance(required, list) else []
            for name in required:
                if name not in value or (value[name] is None and not allow_null):
                    errors.append(f"{self._join(path, name)} should not be empty")
            for name, sub in schema.get("properties", {}).items():
                if name not in value:
                    continue
                if value[name] is None and name not in required:
                    continue  # class-validator's @IsOptional() skips null as well as undefined
                if value[name] is None and not allow_null:
                    continue  # already reported as "should not be empty"
                self._check(sub, value[name], self._join(path, name), errors, allow_null)
        if isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                self._check(schema["items"], item, f"{label}.{i}", errors, allow_null)

    @staticmethod
    def _join(path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

