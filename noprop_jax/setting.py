"""A setting: a dataclass field that carries its one-line help.

The command line's flags, their help and the documentation's flag tables are made from these
fields (`cli`), so a setting is described once, where it is defined:

  @dataclasses.dataclass(frozen=True)
  class Model:
    T: int = setting(10, "number of blocks")
"""

import dataclasses
from typing import Any


def setting(default: Any = dataclasses.MISSING, help: str = "", **field_kw) -> Any:
  """A dataclass field with `help` as its description (no default: a required field)."""
  return dataclasses.field(default=default, metadata={"help": help}, **field_kw)


def help_of(field: dataclasses.Field) -> str:
  """The field's help ('' where it has none, e.g. a user's plain field)."""
  return field.metadata.get("help", "")
