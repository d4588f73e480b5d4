"""A training run's settings, by concern, and the command line made from them.

  method  which method (`METHODS`), and its settings: the fields of that method's
          `Model` other than the block and the data's shapes (e.g. dt.Model.T)
  block   `blocks.BlockConfig`: which provided block, and its options
  data    `DataConfig`: a dataset name or a .npz file of the user's arrays
  train   `TrainConfig`: optimizer, budget, seed, evaluation, execution

Every setting is a dataclass field whose trailing comment is its help: the command
line (`add_flags`, `parse`) and the README's flag table (`flag_table`) are made from
the fields, so they cannot drift apart. Defaults that depend on the method and dataset
(the paper's Table 4 budgets) are filled in by `RunConfig.create`.
"""

import argparse
import dataclasses
import inspect
import re
import typing
from typing import Any

from noprop_jax import adjoint, backprop, core, ct, diffusion_blocks, dt, fm, local
from noprop_jax.blocks import BlockConfig
from noprop_jax.sharding import parse_mesh

METHODS = {"dt": dt, "ct": ct, "fm": fm, "backprop": backprop, "adjoint": adjoint,
           "diffusion_blocks": diffusion_blocks, "local": local}
NOT_SETTINGS = ("block", "input_shape", "num_classes")  # Model fields the data and block fill
NAMED_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet")
TRAININGS = ("parallel", "sequential")
BF16_METHODS = ("dt", "ct", "fm", "diffusion_blocks")

# Paper Table 4's epochs per dataset: DT and backprop, CT and FM, the adjoint. Digits
# (not in the paper) and a user's .npz file take budgets sized for a CPU.
EPOCHS = {"digits": (12, 40, 2), "mnist": (100, 100, 2), "fashion_mnist": (100, 100, 2),
          "cifar10": (150, 500, 4), "cifar100": (150, 1000, 4), "tiny_imagenet": (150, 1000, 4)}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data comes from."""

  dataset: str = "digits"  # a named dataset (digits is embedded) or the path of a .npz file
  data_dir: str | None = None  # directory with the named dataset's original files (else TFDS)
  verify: bool = True  # check --data-dir files against their published checksums

  def __post_init__(self):
    if self.dataset not in NAMED_DATASETS and not self.dataset.endswith(".npz"):
      raise ValueError(f"unknown dataset {self.dataset!r}; choose one of "
                       f"{list(NAMED_DATASETS)} or give a .npz file of your arrays")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How the model is trained and evaluated."""

  epochs: int = 0  # passes over the training set; 0: paper Table 4 for method and dataset
  batch_size: int = 128  # examples per step
  seed: int = 0  # seeds init, batch order, noise and dropout (not compiled in)
  lr: float = 1e-3  # learning rate (DT and baselines AdamW, CT/FM Adam)
  weight_decay: float = 1e-3  # weight decay
  grad_clip: float = 1.0  # clip each block (DT), parameter group (CT/FM) or network by its own gradient norm; 0: off
  training: str = "parallel"  # parallel: every block every step | sequential: Algorithm 1 (DT)
  formulation: str = "auto"  # how a step maps over stacked blocks: auto | vmap | unroll | scan
  blocks_per_step: int = 0  # dt, diffusion_blocks: blocks computed at once, a divisor of T (0: all that fit)
  precision: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  mesh: str = ""  # device mesh blocks=B,data=D (blocks: dt, diffusion_blocks); empty: one device
  inference: str = "mean"  # inference mode of test_accuracy: mean | stochastic
  inference_runs: int = 5  # sampled inference runs averaged in the summary
  eval_every: int = 0  # epochs between test evaluations (0: 1, or 10 for CT/FM on digits)

  def __post_init__(self):
    for name in ("batch_size", "inference_runs"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("epochs", "eval_every", "seed"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    core.check_choice("training", self.training, TRAININGS)
    core.check_choice("inference", self.inference, core.INFERENCE_MODES)
    self.optim, self.compute, self.mesh_shape  # validate

  @property
  def optim(self) -> core.Optim:
    return core.Optim(self.lr, self.weight_decay, self.grad_clip)

  @property
  def compute(self) -> core.Compute:
    return core.Compute(self.formulation, self.blocks_per_step, self.precision)

  @property
  def mesh_shape(self) -> dict[str, int]:
    return parse_mesh(self.mesh)


def method_settings(method: str) -> dict[str, dataclasses.Field]:
  """The method's own settings: its Model's fields other than block and data shapes."""
  return {f.name: f for f in dataclasses.fields(METHODS[method].Model) if f.name not in NOT_SETTINGS}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  method: str = "dt"  # dt | ct | fm (NoProp) | backprop | adjoint (the paper's baselines) | diffusion_blocks | local (greedy local learning)
  model: dict = dataclasses.field(default_factory=dict)  # the method's settings, by name
  block: BlockConfig = BlockConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()

  @classmethod
  def create(cls, method: str = "dt", **settings: Any) -> "RunConfig":
    """A validated run config from flat settings (None meaning 'default'), with the
    method- and dataset-dependent defaults filled in."""
    core.check_choice("method", method, METHODS)
    given = {k: v for k, v in settings.items() if v is not None}
    own = method_settings(method)
    groups = {"block": BlockConfig, "data": DataConfig, "train": TrainConfig}
    parts = {g: {k: given.pop(k) for k in list(given) if k in _names(c)} for g, c in groups.items()}
    model = {k: given.pop(k) for k in list(given) if k in own}
    for k in given:
      if k in ALL_METHOD_SETTINGS:
        users = [m for m in METHODS if k in method_settings(m)]
        raise ValueError(f"--{_flag(k)} is a setting of {', '.join(users)}, not of {method}")
      raise ValueError(f"unknown setting {k!r}")
    data = DataConfig(**parts["data"])
    budgets = EPOCHS.get(data.dataset, EPOCHS["digits"])
    column = {"ct": 1, "fm": 1, "adjoint": 2}.get(method, 0)
    train = parts["train"]
    train.setdefault("epochs", 0)
    train["epochs"] = train["epochs"] or budgets[column]
    if not train.get("eval_every"):
      # CT/FM's 1000-step inference costs ~20x a digits training epoch: evaluate every 10.
      train["eval_every"] = 10 if method in ("ct", "fm") and data.dataset == "digits" else 1
    cfg = cls(method, model, BlockConfig(**parts["block"]), data, TrainConfig(**train))
    cfg.validate()
    return cfg

  def validate(self) -> None:
    """Checks across concerns (each concern validates itself)."""
    mod, tr = METHODS[self.method], self.train
    mesh = tr.mesh_shape
    unknown = set(self.model) - set(method_settings(self.method))
    if unknown:
      raise ValueError(f"{sorted(unknown)} are not settings of {self.method}")
    # The method's own settings are checked by its Model. The data is not loaded yet:
    # placeholder shapes stand in, sized so that an explicit embedding_dim is consistent.
    d, emb = self.model.get("embedding_dim", 0), self.model.get("embedding", "onehot")
    mod.Model(None, (d if emb == "prototype" and d else 1,),
              d if emb == "onehot" and d else 10, **self.model)
    T = self.T
    if tr.training == "sequential" and not hasattr(mod, "sequential_step"):
      raise ValueError(f"--training sequential is NoProp-DT's (Algorithm 1), not {self.method}'s")
    if tr.precision != "float32" and self.method not in BF16_METHODS:
      raise ValueError(f"--precision {tr.precision} is implemented for NoProp-DT, -CT, -FM and "
                       f"DiffusionBlocks, not {self.method}")
    if tr.blocks_per_step and not mod.STACKED:
      raise ValueError(f"--blocks-per-step is for methods whose T blocks train side by side in "
                       f"one step (dt, diffusion_blocks), not {self.method}")
    if mesh["blocks"] > 1:
      if not mod.STACKED:
        raise ValueError(f"a 'blocks' mesh axis shards side-by-side blocks (dt, diffusion_blocks); "
                         f"{self.method} has none to shard (use data=N), got --mesh {tr.mesh}")
      if T % mesh["blocks"]:
        raise ValueError(f"the mesh's blocks={mesh['blocks']} must divide T={T}")
      if tr.training == "sequential":
        raise ValueError("sequential training (Algorithm 1) updates one block per step: shard "
                         f"it with data=N, not blocks={mesh['blocks']}")
      if tr.formulation == "unroll":
        raise ValueError("--formulation unroll indexes blocks one by one, which a blocks-sharded "
                         "mesh cannot split; use vmap (or auto)")
    if tr.batch_size % mesh["data"]:
      raise ValueError(f"batch_size {tr.batch_size} must be divisible by the mesh's "
                       f"data={mesh['data']}")
    k = tr.blocks_per_step
    if k and (k > T or T % k):
      raise ValueError(f"blocks_per_step must divide T={T} (or be 0: automatic), got {k}")
    if k and k % mesh["blocks"]:
      raise ValueError(f"blocks_per_step {k} must be a multiple of the mesh's "
                       f"blocks={mesh['blocks']}, so that every chunk spreads over all devices")

  @property
  def T(self) -> int:
    """The number of stacked blocks (1 for a single time-conditioned block)."""
    return self.model.get("T", getattr(METHODS[self.method].Model, "T", 1))

  def to_dict(self) -> dict[str, Any]:
    """Every setting, by concern. The method's settings that were not given appear at
    their defaults, so an explicit default compares equal to an omitted one (`guard_config`)."""
    defaults = {k: f.default for k, f in method_settings(self.method).items()}
    return {"method": self.method, "model": {**defaults, **self.model},
            **{g: dataclasses.asdict(getattr(self, g)) for g in ("block", "data", "train")}}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
    """The config saved by `to_dict`."""
    try:
      cfg = cls(d["method"], dict(d["model"]), BlockConfig(**d["block"]),
                DataConfig(**d["data"]), TrainConfig(**d["train"]))
    except (KeyError, TypeError) as e:
      raise ValueError(f"not a run config written by this version ({type(e).__name__}: {e})") from None
    cfg.validate()
    return cfg


def _names(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


ALL_METHOD_SETTINGS = {k for m in METHODS for k in method_settings(m)}


# ----------------------------------------------------------------------------- the command line

def field_help(cls) -> dict[str, str]:
  """Each field's trailing comment in `cls`'s source: the settings' one description."""
  out = {}
  for line in inspect.getsource(cls).splitlines():
    m = re.match(r"\s+(\w+): [^=]+=.*?  # (.*)$", line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def _flag(name: str) -> str:
  return name if name == "T" else name.replace("_", "-")


def settings_by_flag() -> dict[str, list[tuple[str, str, dataclasses.Field, str]]]:
  """flag -> [(concern, owner, field, help)]: every setting of every concern and method."""
  out: dict[str, list] = {}
  concerns = [("run", "", RunConfig), ("block", "", BlockConfig), ("data", "", DataConfig),
              ("train", "", TrainConfig)]
  concerns += [("method", m, METHODS[m].Model) for m in METHODS]
  for concern, owner, cls in concerns:
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
      if (concern == "method" and f.name in NOT_SETTINGS) or (concern == "run" and f.name != "method"):
        continue
      out.setdefault(_flag(f.name), []).append((concern, owner, f, helps.get(f.name, "")))
  return out


def _type(f: dataclasses.Field):
  args = [a for a in typing.get_args(f.type) if a is not type(None)]
  return args[0] if args else f.type


def add_flags(p: argparse.ArgumentParser) -> None:
  """One flag per setting; a method's settings say which methods have them, and their defaults."""
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
  """The README's table of `experiments/train.py`'s settings, made from the fields."""
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


def from_args(args: argparse.Namespace) -> RunConfig:
  """The RunConfig of parsed flags (those not given take their defaults)."""
  settings = {f.name: getattr(args, f.name) for owners in settings_by_flag().values()
              for _, _, f, _ in owners[:1]}
  method = settings.pop("method") or "dt"
  core.check_choice("method", method, METHODS)
  return RunConfig.create(method, **{k: v for k, v in settings.items() if v is not None})
