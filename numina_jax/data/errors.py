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
