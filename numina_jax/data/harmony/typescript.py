"""JSON schema to the TypeScript-like text harmony writes for a function's parameters, byte for byte as
openai-harmony 0.0.8 renders a `namespace functions` block."""

from __future__ import annotations

import json
from typing import Any

def _get(obj: Any, key: str) -> Any:
  return obj.get(key) if isinstance(obj, dict) else None


def _str(obj: Any, key: str) -> str | None:
  value = _get(obj, key)
  return value if isinstance(value, str) else None


def _json_value(value: Any) -> str:
  return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _is_enum(schema: Any) -> bool:
  values = _get(schema, "enum")
  return isinstance(values, list) and len(values) > 0


def _default_text(schema: dict, value: Any, bare_enum_string: bool) -> str:
  # harmony quotes a string default by hand, except that in most places an enum's string default goes in bare.
  if isinstance(value, str) and not _is_enum(schema):
    return f'default: "{value}"'
  if isinstance(value, str) and bare_enum_string:
    return f"default: {value}"
  return f"default: {_json_value(value)}"


def _nullable(schema: Any, type_str: str) -> str:
  if _get(schema, "nullable") is True and "null" not in type_str:
    return f"{type_str} | null"
  return type_str


def json_schema_to_typescript(schema: Any, indent: str = "") -> str:
  """The TypeScript-like rendering of a JSON schema that harmony puts in a `namespace functions` block."""
  one_of = _get(schema, "oneOf")
  if isinstance(one_of, list):
    out = ""
    for variant in one_of:
      out += f"\n{indent} | " + _nullable(variant, json_schema_to_typescript(variant, indent + "   "))
      comments = []
      if _str(variant, "description") is not None:
        comments.append(variant["description"])
      if isinstance(variant, dict) and "default" in variant:
        comments.append(_default_text(variant, variant["default"], bare_enum_string=False))
      if comments:
        out += " // " + " ".join(comments)
    return out
  kind = _get(schema, "type")
  if isinstance(kind, list):
    names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
    if names:
      return " | ".join(names)
  if not isinstance(kind, str):
    return "any"
  if kind == "object":
    return _object_to_typescript(schema, indent)
  if kind == "string":
    values = [f'"{v}"' for v in (_get(schema, "enum") or []) if isinstance(v, str)] if _is_enum(schema) else []
    return " | ".join(values) if values else "string"
  if kind in ("number", "integer"):
    return "number"
  if kind == "boolean":
    return "boolean"
  if kind == "array":
    if "items" in schema:
      return json_schema_to_typescript(schema["items"], indent) + "[]"
    return "Array<any>"
  return "any"


def _object_to_typescript(schema: dict, indent: str) -> str:
  out = ""
  if _str(schema, "description") is not None:
    out += f"{indent}// {schema['description']}\n"
  out += "{\n"
  props = schema.get("properties")
  if isinstance(props, dict):
    required = {r for r in (schema.get("required") or []) if isinstance(r, str)} \
        if isinstance(schema.get("required"), list) else set()
    for key, val in props.items():
      optional = "" if key in required else "?"
      if _str(val, "title") is not None:
        out += f"{indent}// {val['title']}\n{indent}//\n"
      if _get(val, "oneOf") is None and _str(val, "description") is not None:
        out += f"{indent}// {val['description']}\n"
      examples = _get(val, "examples")
      if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        for example in examples:
          if isinstance(example, str):
            out += f'{indent}// - "{example}"\n'
      variants = _get(val, "oneOf")
      if isinstance(variants, list):
        out += _one_of_property(key, optional, val, variants, indent)
        continue
      out += f"{indent}{key}{optional}: " + _nullable(val, json_schema_to_typescript(val, indent + "    ")) + ","
      if _get(val, "oneOf") is None and isinstance(val, dict) and "default" in val:
        out += " // " + _default_text(val, val["default"], bare_enum_string=True)
      out += "\n"
  return out + f"{indent}}}"


def _one_of_property(key: str, optional: str, val: dict, variants: list, indent: str) -> str:
  out = ""
  prop_desc = _str(val, "description")
  # A property description equal to its first variant's is written once, by harmony's rule.
  skip = prop_desc is not None and bool(variants) and _str(variants[0], "description") == prop_desc
  above = False
  if not skip and prop_desc is not None:
    out += f"{indent}// {prop_desc}\n"
    above = True
  if "default" in val:
    out += f"{indent}// " + _default_text(val, val["default"], bare_enum_string=True) + "\n"
  out += f"{indent}{key}{optional}:\n"
  for i, variant in enumerate(variants):
    out += f"{indent} | " + _nullable(variant, json_schema_to_typescript(variant, indent + "   "))
    comments = []
    desc = _str(variant, "description")
    if not (i == 0 and above) and desc is not None and desc != prop_desc:
      comments.append(desc)
    if isinstance(variant, dict) and "default" in variant:
      comments.append(_default_text(variant, variant["default"], bare_enum_string=True))
    if comments:
      out += " // " + " ".join(comments)
    out += "\n"
  return out + f"{indent},\n"
