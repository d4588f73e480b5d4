"""A training run's settings, by concern.

  method  a registered method's name (`noprop_jax.method`), and its settings: the fields
          of that method's `Model` after block, input_shape and num_classes (e.g. dt.Model.T)
  block   `blocks.BlockConfig`: which provided block, and its options
  data    `DataConfig`: a dataset name or a .npz file of the user's arrays
  train   `TrainConfig`: optimizer, budget, seed, evaluation, execution

Every setting is a dataclass field that carries its help (`setting`): the command line
and the documentation's flag tables (`cli`) are made from the fields. Defaults that depend on the
method and dataset (its training budget, how often to evaluate) come from the method's
record, filled in by `RunConfig.create`.
"""

import dataclasses
from typing import Any

from noprop_jax import core
from noprop_jax import method as methods
from noprop_jax.blocks import BlockConfig
from noprop_jax.setting import setting
from noprop_jax.sharding import parse_mesh

NOT_SETTINGS = ("block", "input_shape", "num_classes")  # Model fields the data and block fill
# The command-line scripts' own flags (experiments/train.py): no setting may take their names.
SCRIPT_FLAGS = ("method_module", "workdir", "checkpoint_every", "no_progress", "distributed",
                "flag_table")
NAMED_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet")
TRAININGS = ("parallel", "sequential")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data comes from."""

  dataset: str = setting(
      "digits", "a named dataset (digits is embedded) or the path of a .npz file")
  data_dir: str | None = setting(
      None, "directory with the named dataset's original files (else TFDS)")
  verify: bool = setting(True, "check --data-dir files against their published checksums")

  def __post_init__(self):
    if self.dataset not in NAMED_DATASETS and not self.dataset.endswith(".npz"):
      raise ValueError(f"unknown dataset {self.dataset!r}; choose one of "
                       f"{list(NAMED_DATASETS)} or give a .npz file of your arrays")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How the model is trained and evaluated."""

  epochs: int = setting(0, "passes over the training set; 0: paper Table 4 for method and dataset")
  batch_size: int = setting(128, "examples per step")
  seed: int = setting(0, "seeds init, batch order, noise and dropout (not compiled in)")
  lr: float = setting(1e-3, "learning rate (of the method's optimizer: AdamW or Adam)")
  weight_decay: float = setting(1e-3, "weight decay")
  grad_clip: float = setting(
      1.0, "clip each block, parameter group or network (as the method groups them) by its own gradient norm; 0: off")
  training: str = setting(
      "parallel", "parallel: every block every step | sequential: Algorithm 1, one block per step (methods that have it)")
  formulation: str = setting(
      "auto", "how a step maps over stacked blocks: auto | vmap | unroll | scan")
  blocks_per_step: int = setting(
      0, "side-by-side blocks (e.g. dt): blocks computed at once, a divisor of T (0: all that fit)")
  precision: str = setting("float32", "compute dtype: float32 | bfloat16 (parameters stay float32)")
  mesh: str = setting(
      "", "device mesh blocks=B,data=D (blocks: side-by-side blocks only); empty: one device")
  inference: str = setting("mean", "inference mode of test_accuracy: mean | stochastic")
  inference_runs: int = setting(5, "sampled inference runs averaged in the summary")
  eval_every: int = setting(0, "epochs between test evaluations (0: the method's default for the dataset, else 1)")

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
  """The method's own settings: its Model's fields other than block and data shapes. A
  setting named like another concern's (or a script's flag) is refused: its flag would
  set the other one."""
  own = methods.settings(methods.get(method))
  clash = set(own) & (_names(RunConfig) | _names(BlockConfig) | _names(DataConfig)
                      | _names(TrainConfig) | set(SCRIPT_FLAGS))
  if clash:
    raise ValueError(f"method {method!r}: its settings {sorted(clash)} have the names of the "
                     "run's other settings or of the scripts' flags; rename them")
  return own


@dataclasses.dataclass(frozen=True)
class RunConfig:
  method: str = setting(methods.DEFAULT, "the method: a registered name (see --help's list)")
  model: dict = setting(help="the method's settings, by name", default_factory=dict)
  block: BlockConfig = setting(BlockConfig(), "which provided block, and its options")
  data: DataConfig = setting(DataConfig(), "where the data comes from")
  train: TrainConfig = setting(TrainConfig(), "how the model is trained and evaluated")

  @classmethod
  def create(cls, method: str = methods.DEFAULT, **settings: Any) -> "RunConfig":
    """A validated run config from flat settings (None meaning 'default'), with the
    method- and dataset-dependent defaults filled in."""
    record = methods.get(method)
    given = {k: v for k, v in settings.items() if v is not None}
    own = method_settings(method)
    groups = {"block": BlockConfig, "data": DataConfig, "train": TrainConfig}
    parts = {g: {k: given.pop(k) for k in list(given) if k in _names(c)} for g, c in groups.items()}
    model = {k: given.pop(k) for k in list(given) if k in own}
    for k in given:
      users = [m for m in methods.names() if k in method_settings(m)]
      if users:
        raise ValueError(f"--{k.replace('_', '-') if k != 'T' else k} is a setting of "
                         f"{', '.join(users)}, not of {method}")
      raise ValueError(f"unknown setting {k!r}")
    data = DataConfig(**parts["data"])
    train = parts["train"]
    train["epochs"] = train.get("epochs") or record.budget(data.dataset)
    train["eval_every"] = train.get("eval_every") or record.eval_every.get(data.dataset, 1)
    cfg = cls(method, model, BlockConfig(**parts["block"]), data, TrainConfig(**train))
    cfg.validate()
    return cfg

  @property
  def method_record(self) -> methods.Method:
    return methods.get(self.method)

  def validate(self) -> None:
    """Checks across concerns (each concern validates itself), by what the method
    supports (its record)."""
    m, tr = self.method_record, self.train
    mesh = tr.mesh_shape
    unknown = set(self.model) - set(method_settings(self.method))
    if unknown:
      raise ValueError(f"{sorted(unknown)} are not settings of {self.method}")
    # The method's own settings are checked by its Model. The data is not loaded yet:
    # placeholder shapes stand in, sized so that an explicit embedding_dim is consistent.
    d, emb = self.model.get("embedding_dim", 0), self.model.get("embedding", "onehot")
    m.Model(None, (d if emb == "prototype" and d else 1,),
            d if emb == "onehot" and d else 10, **self.model)
    T = self.T
    if tr.training == "sequential" and not m.sequential:
      raise ValueError(f"--training sequential (Algorithm 1: one block per step) is not "
                       f"implemented by {self.method}; methods that have it: "
                       f"{[r.name for r in methods.registered() if r.sequential]}")
    if tr.precision != "float32" and not m.bf16:
      raise ValueError(f"--precision {tr.precision} is not implemented by {self.method}; methods "
                       f"that have it: {[r.name for r in methods.registered() if r.bf16]}")
    if tr.blocks_per_step and not m.side_by_side:
      raise ValueError(f"--blocks-per-step is for methods whose T blocks train side by side in "
                       f"one step ({_side_by_side()}), not {self.method}")
    if mesh["blocks"] > 1:
      if not m.side_by_side:
        raise ValueError(f"a 'blocks' mesh axis shards side-by-side blocks ({_side_by_side()}); "
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
    own = method_settings(self.method)
    return self.model.get("T", own["T"].default if "T" in own else 1)

  @property
  def resumable(self) -> tuple[str, ...]:
    """The settings that may change when this run resumes (they do not change what it
    computes): the training settings below, and the method's own (e.g. inference steps)."""
    return RESUMABLE + self.method_record.resumable

  def to_dict(self) -> dict[str, Any]:
    """Every setting, by concern. The method's settings that were not given appear at
    their defaults, so an explicit default compares equal to an omitted one (`workdir.config_changes`)."""
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


# Settings that change how a step executes, not what it computes; the epoch budget; and
# the optimizer's settings, so that a run that diverged can go on from its last good
# checkpoint with a lower learning rate. A resumed run may change them (config.json's
# history records it), and the method's own `resumable` ones.
RESUMABLE = ("epochs", "formulation", "conv_impl", "blocks_per_step", "mesh", "precision",
             "inference_runs", "eval_every", "lr", "weight_decay", "grad_clip")


def _side_by_side() -> str:
  return ", ".join(m.name for m in methods.registered() if m.side_by_side)


def _names(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}
