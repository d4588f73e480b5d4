"""Frozen, hashable run configuration with the paper's Table 4 defaults.

The config is static for `jax.jit`: everything in it fixes shapes or code
paths, so one config compiles each step function exactly once.
"""

import dataclasses
from typing import Any

import jax

METHODS = ("dt", "ct", "fm")
LATER_METHODS = ("backprop", "adjoint")  # announced flags, not implemented yet
EMBEDDINGS = ("onehot", "learned")
FORMULATIONS = ("auto", "vmap", "unroll", "scan")
CONV_IMPLS = ("auto", "xla", "patches")
TRAININGS = ("parallel", "sequential")
INFERENCE_MODES = ("mean", "stochastic")
CT_SAMPLERS = ("ode", "sde")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  image_shape: tuple[int, int, int]
  num_classes: int
  padding: str  # the block's conv padding: the paper's "VALID", or "SAME" where images are too small
  epochs_dt: int  # paper Table 4 (digits: ours, not in the paper)
  epochs_ct: int  # NoProp-CT and -FM, paper Table 4

  def default_epochs(self, method: str) -> int:
    return self.epochs_ct if method in ("ct", "fm") else self.epochs_dt


DATASETS: dict[str, DatasetInfo] = {
    # 8x8 images are too small for the unpadded tower (8 -> 6 -> 3 -> 1 -> fails): pad it.
    "digits": DatasetInfo((8, 8, 1), 10, "SAME", 12, 40),
    "mnist": DatasetInfo((28, 28, 1), 10, "VALID", 100, 100),
    "fashion_mnist": DatasetInfo((28, 28, 1), 10, "VALID", 100, 100),
    "cifar10": DatasetInfo((32, 32, 3), 10, "VALID", 150, 500),
    "cifar100": DatasetInfo((32, 32, 3), 100, "VALID", 150, 1000),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """A NoProp run. `Config.create` fills method- and dataset-dependent defaults and validates.

  DT-only: T, training, formulation, alpha_bar_min/max. CT/FM-only:
  inference_steps, fm_sigma, ct_sampler, gamma_0_init/gamma_1_init.
  """

  method: str = "dt"
  dataset: str = "digits"
  embedding: str = "onehot"
  embedding_dim: int = 10  # == num_classes for one-hot
  T: int = 10
  epochs: int = 12
  batch_size: int = 128
  lr: float = 1e-3
  weight_decay: float = 1e-3
  eta: float = 0.1  # DT 0.1, CT 1 (paper Table 4); FM has no eta
  grad_clip: float = 1.0  # per block, by that block's own gradient norm; 0 disables
  dropout: float = 0.2
  seed: int = 0
  training: str = "parallel"  # "sequential" is the paper's Algorithm 1
  formulation: str = "auto"  # how the parallel step maps over blocks
  conv_impl: str = "auto"  # "patches": matmul weight gradient (fast on XLA:CPU in vmap/scan)
  inference: str = "mean"  # default inference mode for test_accuracy
  inference_runs: int = 5  # stochastic runs averaged in the summary (paper: 5)
  eval_every: int = 1  # epochs between test evaluations (the last epoch always evaluates)
  alpha_bar_min: float = 1e-4
  alpha_bar_max: float = 0.9999
  inference_steps: int = 1000  # Euler steps of CT/FM inference (paper: 1000)
  fm_sigma: float = 0.0  # std of the Gaussian around FM's straight path
  ct_sampler: str = "ode"  # CT: probability-flow ODE (Euler) or reverse SDE (Euler-Maruyama)
  # Initial learned-schedule endpoints (CT): gamma(1) = gamma_0, gamma(0) = gamma_1.
  # +-3.5 puts alpha_bar in [0.029, 0.971], about the span of the DT blocks' inputs
  # (the last one sees 0.972), and keeps the SNR' weights within ~2 orders of
  # magnitude; +-5 (alpha_bar in [0.007, 0.993]) gave 95.3% against 96.3% after one
  # MNIST epoch (100 inference steps). Both endpoints then train (Algorithm 2).
  gamma_0_init: float = -3.5
  gamma_1_init: float = 3.5

  @property
  def info(self) -> DatasetInfo:
    return DATASETS[self.dataset]

  @property
  def num_classes(self) -> int:
    return self.info.num_classes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.info.image_shape

  @classmethod
  def create(cls, **overrides: Any) -> "Config":
    """Config for `dataset` with the paper's defaults, `None` values meaning 'default'."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    dataset = overrides.get("dataset", cls.dataset)
    if dataset not in DATASETS:
      raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    info = DATASETS[dataset]
    method = overrides.get("method", cls.method)
    overrides.setdefault("epochs", info.default_epochs(method))
    if method == "ct":
      overrides.setdefault("eta", 1.0)
    if method in ("ct", "fm") and dataset == "digits":
      # 1000-step inference on digits costs ~20x a training epoch there: evaluate every 10.
      overrides.setdefault("eval_every", 10)
    if overrides.get("embedding", cls.embedding) == "onehot":
      dim = overrides.get("embedding_dim", info.num_classes)
      if dim != info.num_classes:
        raise ValueError(f"embedding_dim={dim} with a one-hot embedding: it must equal the "
                         f"number of classes ({info.num_classes}); use --embedding learned")
      overrides["embedding_dim"] = info.num_classes
    else:
      overrides.setdefault("embedding_dim", 20)
    cfg = cls(**overrides)
    cfg.validate()
    return cfg

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    """The config saved by `to_dict` (settings added since take their defaults)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown config settings {sorted(unknown)}")
    cfg = cls(**d)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    def bad(msg):
      raise ValueError(msg)

    if self.method in LATER_METHODS:
      bad(f"method {self.method!r} is not implemented yet; available: {list(METHODS)}")
    if self.method not in METHODS:
      bad(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
    if self.dataset not in DATASETS:
      bad(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
    for name, allowed in (("embedding", EMBEDDINGS), ("formulation", FORMULATIONS),
                          ("conv_impl", CONV_IMPLS), ("training", TRAININGS),
                          ("inference", INFERENCE_MODES), ("ct_sampler", CT_SAMPLERS)):
      if getattr(self, name) not in allowed:
        bad(f"unknown {name} {getattr(self, name)!r}; choose one of {list(allowed)}")
    if self.T < 1:
      bad(f"T must be >= 1 (number of blocks), got {self.T}")
    if self.epochs < 1:
      bad(f"epochs must be >= 1, got {self.epochs}")
    if self.batch_size < 1:
      bad(f"batch_size must be >= 1, got {self.batch_size}")
    if not self.lr > 0:
      bad(f"learning rate must be > 0, got {self.lr}")
    if self.weight_decay < 0:
      bad(f"weight_decay must be >= 0, got {self.weight_decay}")
    if not self.eta > 0:
      bad(f"eta must be > 0, got {self.eta}")
    if self.grad_clip < 0:
      bad(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
    if not 0 <= self.dropout < 1:
      bad(f"dropout must be in [0, 1), got {self.dropout}")
    if self.embedding_dim < 1:
      bad(f"embedding_dim must be >= 1, got {self.embedding_dim}")
    if self.eval_every < 1:
      bad(f"eval_every must be >= 1, got {self.eval_every}")
    if self.inference_runs < 1:
      bad(f"inference_runs must be >= 1, got {self.inference_runs}")
    if self.method != "dt" and self.training != "parallel":
      bad(f"--training {self.training} is NoProp-DT's (Algorithm 1); {self.method} has one block")
    if self.inference_steps < 1:
      bad(f"inference_steps must be >= 1, got {self.inference_steps}")
    if self.fm_sigma < 0:
      bad(f"fm_sigma must be >= 0, got {self.fm_sigma}")
    if not self.gamma_1_init > self.gamma_0_init:
      bad("the schedule needs gamma_1_init > gamma_0_init (gamma decreases from the noise end "
          f"t = 0 to the label end t = 1), got {self.gamma_0_init}, {self.gamma_1_init}")
    if not 0 < self.alpha_bar_min < self.alpha_bar_max < 1:
      bad("need 0 < alpha_bar_min < alpha_bar_max < 1 so every SNR is finite, got "
          f"{self.alpha_bar_min}, {self.alpha_bar_max}")

  def resolved_formulation(self) -> str:
    """'auto' -> 'vmap' on GPU/TPU; on XLA:CPU, where conv weight gradients under
    vmap or in loops are slow, the blocks unrolled in one jit (measured fastest)."""
    if self.method != "dt":
      return "single"  # one time-conditioned block
    if self.formulation != "auto":
      return self.formulation
    return "unroll" if jax.default_backend() == "cpu" else "vmap"

  def resolved_conv_impl(self) -> str:
    """'auto' -> the matmul weight gradient only where it pays: on XLA:CPU under
    vmap or scan (3.0 s vs ~16 s per 10-block step); unrolled, the stock conv wins."""
    if self.conv_impl != "auto":
      return self.conv_impl
    slow_there = jax.default_backend() == "cpu" and self.resolved_formulation() in ("vmap", "scan")
    return "patches" if slow_there else "xla"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
