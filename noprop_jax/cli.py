"""The command line made from the settings: one flag per setting, its help from the
setting's definition (`setting.help_of`), and the documentation's tables of them
(every flag; one method's own).

A method of one's own joins the command line by registering before the flags are made:
`--method-module MODULE` (a module name or a .py file) imports the module that calls
`noprop_jax.method.register`, first.
"""

import argparse
import dataclasses
import importlib
import importlib.util
import sys
import typing
from pathlib import Path

from noprop_jax import method as methods
from noprop_jax.blocks import BlockConfig
from noprop_jax.config import NOT_SETTINGS, DataConfig, RunConfig, TrainConfig
from noprop_jax.setting import help_of


def import_method_modules(argv: list[str]) -> list[str]:
  """Import every --method-module named in `argv` (a module on sys.path, or the path of a
  .py file), so that the methods they register have flags. Returns their names."""
  pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  pre.add_argument("--method-module", action="append", default=[])
  names = pre.parse_known_args(argv)[0].method_module
  for name in names:
    if name.endswith(".py"):
      _import_file(name)
      continue
    try:
      importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name.split(".")[0] and e.name != name:
        raise  # the module is there, but something it imports is not: its own error
      raise ValueError(f"--method-module {name}: {e} (give a module on the Python path, "
                       "or the path of a .py file)") from None
  return names


def _import_file(name: str) -> None:
  """Import the .py file `name` once per process, under a name of its own (never one of an
  importable module: a file json.py must not replace the standard library's json)."""
  path = Path(name).resolve()
  if not path.is_file():
    raise ValueError(f"--method-module {name}: no such file")
  for module in list(sys.modules.values()):  # already imported, under any name
    if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path:
      return
  key = f"_noprop_method_module_{abs(hash(str(path))):x}"
  spec = importlib.util.spec_from_file_location(key, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[key] = module  # for the dataclasses and pickles that look their module up
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[key]
    raise


def _flag(name: str) -> str:
  return name if name == "T" else name.replace("_", "-")


def settings_by_flag() -> dict[str, list[tuple[str, str, dataclasses.Field, str]]]:
  """flag -> [(concern, owner, field, help)]: every setting of every concern and of every
  registered method."""
  out: dict[str, list] = {}
  concerns = [("run", "", RunConfig), ("block", "", BlockConfig), ("data", "", DataConfig),
              ("train", "", TrainConfig)]
  concerns += [("method", m, methods.get(m).Model) for m in methods.names()]
  for concern, owner, cls in concerns:
    for f in dataclasses.fields(cls):
      if (concern == "method" and f.name in NOT_SETTINGS) or (concern == "run" and f.name != "method"):
        continue
      out.setdefault(_flag(f.name), []).append((concern, owner, f, _help(concern, f)))
  return out


def _help(concern: str, f: dataclasses.Field) -> str:
  if concern == "run":  # the method flag lists what is registered
    return " | ".join(f"{m.name} ({m.title})" for m in methods.registered())
  return help_of(f)


def _type(f: dataclasses.Field):
  args = [a for a in typing.get_args(f.type) if a is not type(None)]
  return args[0] if args else f.type


def add_flags(p: argparse.ArgumentParser) -> None:
  """One flag per setting; a method's settings say which methods have them, and their
  defaults; --method-module imports a module that registers a method of one's own."""
  p.add_argument("--method-module", action="append", default=[], metavar="MODULE",
                 help="a module (name, or path of a .py file) that registers a method of your "
                 "own (noprop_jax.method.register); may repeat")
  for flag, owners in settings_by_flag().items():
    concern, _, f, help_ = owners[0]
    if concern == "method":
      defaults = ", ".join(f"{o} {g.default}" for _, o, g, _ in owners)
      help_ = f"{help_} ({defaults})"
    elif f.default not in (None, "") and f.name != "method" and _type(f) is not bool:
      help_ = f"{help_} ({f.default!r})"
    dest = f.name
    if _type(f) is bool:
      help_ = f"do not {help_}" if f.default else help_
      p.add_argument(f"--no-{flag}" if f.default else f"--{flag}", dest=dest, default=None,
                     action="store_false" if f.default else "store_true", help=help_)
    else:
      p.add_argument(f"--{flag}", dest=dest, type=_type(f), default=None, help=help_)


def flag_table() -> str:
  """The documentation's table of `experiments/train.py`'s settings, made from the fields."""
  rows = ["| flag | concern | meaning (default) |", "|---|---|---|"]
  for flag, owners in settings_by_flag().items():
    concern, _, f, help_ = owners[0]
    name = f"--no-{flag}" if _type(f) is bool and f.default else f"--{flag}"
    if concern == "method":
      where = ", ".join(o for _, o, _, _ in owners)
      default = ", ".join(f"{o}: {g.default}" for _, o, g, _ in owners)
    elif _type(f) is bool or f.name == "method" or f.default in (None, ""):
      where, default = concern, ""
      help_ = f"do not {help_}" if _type(f) is bool and f.default else help_
    else:
      where, default = concern, repr(f.default)
    help_ = help_.replace("|", "\\|")
    rows.append(f"| `{name}` | {where} | {help_}{f' ({default})' if default else ''} |")
  return "\n".join(rows)


def method_table(name: str) -> str:
  """The table of one registered method's own settings: flag, meaning and its default."""
  rows = ["| flag | meaning | default |", "|---|---|---|"]
  for flag, owners in settings_by_flag().items():
    for concern, owner, f, help_ in owners:
      if concern == "method" and owner == name:
        help_ = help_.replace("|", "\\|")
        rows.append(f"| `--{flag}` | {help_} | `{f.default!r}` |")
  if len(rows) == 2:
    return f"{methods.get(name).title} has no settings of its own."
  return "\n".join(rows)


def from_args(args: argparse.Namespace) -> RunConfig:
  """The RunConfig of parsed flags (those not given take their defaults)."""
  settings = {f.name: getattr(args, f.name) for owners in settings_by_flag().values()
              for _, _, f, _ in owners[:1]}
  method = settings.pop("method") or methods.DEFAULT
  methods.get(method)  # an unknown name: the registry's error
  return RunConfig.create(method, **{k: v for k, v in settings.items() if v is not None})


__all__ = ["add_flags", "flag_table", "from_args", "import_method_modules", "method_table",
           "settings_by_flag"]
