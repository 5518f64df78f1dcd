"""The error raised for a malformed row: it names the dataset, the row and the field."""

from __future__ import annotations


class BadRowError(ValueError):
  """A row that cannot be rendered; `reason` is a short key used to count skipped rows."""

  def __init__(self, dataset: str | None, index: int | None, field: str | None, message: str, reason: str):
    self.dataset = dataset
    self.index = index
    self.field = field
    self.reason = reason
    where = f"{dataset or '<example>'}: row {index if index is not None else '?'}"
    if field is not None:
      where += f": field {field!r}"
    super().__init__(f"{where}: {message}")


class RowContext:
  """Where a row came from, so that every check can raise a BadRowError naming it."""

  __slots__ = ("dataset", "index")

  def __init__(self, dataset: str | None = None, index: int | None = None):
    self.dataset = dataset
    self.index = index

  def error(self, field: str | None, message: str, reason: str) -> BadRowError:
    return BadRowError(self.dataset, self.index, field, message, reason)

  def string(self, obj: dict, key: str, field: str | None = None, required: bool = True) -> str | None:
    """obj[key], which must be a string (None when absent and not `required`); errors name `field` (default key)."""
    value = obj.get(key)
    if value is None:
      if required:
        raise self.error(field or key, "missing", "missing_field")
      return None
    if not isinstance(value, str):
      raise self.error(field or key, f"expected a string, got {type(value).__name__}", "not_a_string")
    return value
