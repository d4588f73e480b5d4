"""Frozen, hashable run configuration with the paper's Table 4 defaults.

The config is static for `jax.jit`: everything in it fixes shapes or code
paths, so one config compiles each step function exactly once.
"""

import dataclasses
from typing import Any

import jax

METHODS = ("dt", "ct", "fm", "backprop", "adjoint")
EMBEDDINGS = ("onehot", "learned", "prototype")
CLASSIFIERS = ("softmax", "radial")
FORMULATIONS = ("auto", "vmap", "unroll", "scan")
CONV_IMPLS = ("auto", "xla", "patches", "gemm")
TRAININGS = ("parallel", "sequential")
INFERENCE_MODES = ("mean", "stochastic")
CT_SAMPLERS = ("ode", "sde")
PRECISIONS = ("float32", "bfloat16")
MESH_AXES = ("blocks", "data")


def parse_mesh(spec: str) -> dict[str, int]:
  """'blocks=4,data=2' -> {'blocks': 4, 'data': 2} (a missing axis has size 1; '' is one device)."""
  sizes = {"blocks": 1, "data": 1}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES:
      raise ValueError(f"bad mesh {spec!r}: write it as 'blocks=B,data=D' (axes {list(MESH_AXES)})")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"bad mesh {spec!r}: {name} must be a whole number, got {value!r}") from None
    if sizes[name] < 1:
      raise ValueError(f"bad mesh {spec!r}: {name} must be >= 1, got {sizes[name]}")
  return sizes


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  image_shape: tuple[int, int, int]
  num_classes: int
  padding: str  # the block's conv padding: the paper's "VALID", or "SAME" where images are too small
  epochs_dt: int  # paper Table 4 (digits: ours, not in the paper)
  epochs_ct: int  # NoProp-CT and -FM, paper Table 4
  epochs_adjoint: int  # the adjoint baseline, paper Table 4

  @property
  def image_size(self) -> int:
    """H * W * C: the dimension of prototype embeddings."""
    h, w, c = self.image_shape
    return h * w * c

  def default_epochs(self, method: str) -> int:
    """DT and backprop share a row of Table 4; CT and FM another; the adjoint its own."""
    if method == "adjoint":
      return self.epochs_adjoint
    return self.epochs_ct if method in ("ct", "fm") else self.epochs_dt


DATASETS: dict[str, DatasetInfo] = {
    # 8x8 images are too small for the unpadded tower (8 -> 6 -> 3 -> 1 -> fails): pad it.
    "digits": DatasetInfo((8, 8, 1), 10, "SAME", 12, 40, 2),
    "mnist": DatasetInfo((28, 28, 1), 10, "VALID", 100, 100, 2),
    "fashion_mnist": DatasetInfo((28, 28, 1), 10, "VALID", 100, 100, 2),
    "cifar10": DatasetInfo((32, 32, 3), 10, "VALID", 150, 500, 4),
    "cifar100": DatasetInfo((32, 32, 3), 100, "VALID", 150, 1000, 4),
    # Not in Table 4: CIFAR-100's budgets (the closest in size and difficulty).
    "tiny_imagenet": DatasetInfo((64, 64, 3), 200, "VALID", 150, 1000, 4),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """A NoProp run. `Config.create` fills method- and dataset-dependent defaults and validates.

  DT-only: training, formulation, classifier, alpha_bar_min/max (T: DT and
  backprop). CT/FM: inference_steps (also the adjoint's solver steps in
  training), fm_sigma, ct_sampler, gamma_0_init/gamma_1_init.
  """

  method: str = "dt"
  dataset: str = "digits"
  embedding: str = "onehot"
  embedding_dim: int = 10  # == num_classes for one-hot, == H * W * C for prototype
  classifier: str = "softmax"  # DT: p(y | z_T) by a linear softmax (Eq. 14) or "radial" (Eq. 15-16)
  radial_sigma: float = 1.0  # the radial classifier's sigma
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
  blocks_per_step: int = 0  # blocks computed at once in the parallel step (0: auto, the fastest that fits)
  mesh: str = ""  # device mesh, e.g. "blocks=4,data=2" (blocks: DT only); "" is one device
  precision: str = "float32"  # "bfloat16": bf16 compute, float32 parameters and optimizer state
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
    if method == "adjoint":
      overrides.setdefault("embedding", "onehot")  # the paper's adjoint row: W_embed fixed
    if method in ("ct", "fm") and dataset == "digits":
      # 1000-step inference on digits costs ~20x a training epoch there: evaluate every 10.
      overrides.setdefault("eval_every", 10)
    embedding = overrides.get("embedding", cls.embedding)
    fixed = {"onehot": (info.num_classes, "the number of classes"),
             "prototype": (info.image_size, "the image size H * W * C")}
    if embedding in fixed:
      want, what = fixed[embedding]
      dim = overrides.get("embedding_dim", want)
      if dim != want:
        raise ValueError(f"embedding_dim={dim} with a {embedding} embedding: it must equal "
                         f"{what} ({want}); use --embedding learned for another size")
      overrides["embedding_dim"] = want
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

    if self.method not in METHODS:
      bad(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
    if self.dataset not in DATASETS:
      bad(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
    for name, allowed in (("embedding", EMBEDDINGS), ("formulation", FORMULATIONS),
                          ("conv_impl", CONV_IMPLS), ("training", TRAININGS),
                          ("inference", INFERENCE_MODES), ("ct_sampler", CT_SAMPLERS),
                          ("classifier", CLASSIFIERS), ("precision", PRECISIONS)):
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
      bad(f"--training {self.training} is NoProp-DT's (Algorithm 1), not {self.method}'s")
    if self.method != "dt" and self.classifier != "softmax":
      bad(f"--classifier {self.classifier} is a NoProp-DT option (Eq. 15-16), not {self.method}'s")
    if self.method == "adjoint" and self.embedding != "onehot":
      bad("the adjoint baseline uses a fixed one-hot embedding (as in the paper); "
          f"got --embedding {self.embedding}")
    if self.embedding == "prototype" and self.embedding_dim != self.info.image_size:
      bad(f"a prototype embedding has the image size {self.info.image_size} as its dimension, "
          f"got embedding_dim={self.embedding_dim}")
    if self.precision != "float32" and self.method not in ("dt", "ct", "fm"):
      bad(f"--precision {self.precision} is implemented for NoProp-DT, -CT and -FM, not {self.method}")
    mesh = parse_mesh(self.mesh)
    if mesh["blocks"] > 1:
      if self.method != "dt":
        bad(f"a 'blocks' mesh axis shards NoProp-DT's blocks; {self.method} has none to shard "
            f"(use data=N), got --mesh {self.mesh}")
      if self.T % mesh["blocks"]:
        bad(f"the mesh's blocks={mesh['blocks']} must divide T={self.T}")
      if self.training == "sequential":
        bad("sequential training (Algorithm 1) updates one block per step: shard it with "
            f"data=N, not blocks={mesh['blocks']}")
      if self.formulation == "unroll":
        bad("--formulation unroll indexes blocks one by one, which a blocks-sharded mesh "
            "cannot split; use vmap (or auto)")
    if self.batch_size % mesh["data"]:
      bad(f"batch_size {self.batch_size} must be divisible by the mesh's data={mesh['data']}")
    k = self.blocks_per_step
    if k < 0 or k > self.T or (k and self.T % k):
      bad(f"blocks_per_step must divide T={self.T} (or be 0: automatic), got {k}")
    if k and self.method != "dt":
      bad(f"--blocks-per-step is NoProp-DT's (its T blocks in one step), not {self.method}'s")
    if k and self.formulation == "scan" and k != 1:
      bad(f"--formulation scan is one block at a time (blocks_per_step 1), got {k}")
    if k and k % mesh["blocks"]:
      bad(f"blocks_per_step {k} must be a multiple of the mesh's blocks={mesh['blocks']}, "
          "so that every chunk spreads over all devices")
    if self.inference_steps < 1:
      bad(f"inference_steps must be >= 1, got {self.inference_steps}")
    if not self.radial_sigma > 0:
      bad(f"radial_sigma must be > 0, got {self.radial_sigma}")
    if self.fm_sigma < 0:
      bad(f"fm_sigma must be >= 0, got {self.fm_sigma}")
    if not self.gamma_1_init > self.gamma_0_init:
      bad("the schedule needs gamma_1_init > gamma_0_init (gamma decreases from the noise end "
          f"t = 0 to the label end t = 1), got {self.gamma_0_init}, {self.gamma_1_init}")
    if not 0 < self.alpha_bar_min < self.alpha_bar_max < 1:
      bad("need 0 < alpha_bar_min < alpha_bar_max < 1 so every SNR is finite, got "
          f"{self.alpha_bar_min}, {self.alpha_bar_max}")

  @property
  def mesh_shape(self) -> dict[str, int]:
    return parse_mesh(self.mesh)

  def resolved_formulation(self) -> str:
    """'auto' -> 'vmap' on GPU/TPU and on a blocks-sharded mesh; on XLA:CPU, where conv
    weight gradients under vmap or in loops are slow, the blocks unrolled in one jit
    (measured fastest, experiments/benchmark.py)."""
    if self.method in ("ct", "fm", "adjoint"):
      return "single"  # one time-conditioned block
    if self.method == "backprop":
      return "chain"  # the blocks run one after another, as a forward pass must
    if self.formulation != "auto":
      return self.formulation
    if jax.default_backend() == "cpu" and self.mesh_shape["blocks"] == 1:
      return "unroll"
    return "vmap"

  def resolved_blocks_per_step(self) -> int:
    """Blocks computed at once: 1 for 'scan', else blocks_per_step or, for 0 (auto), all T.

    (`trainer.fit_blocks_per_step` lowers 'auto' further where all T do not fit
    in device memory.)"""
    if self.resolved_formulation() == "scan":
      return 1
    return self.blocks_per_step or self.T

  def resolved_conv_impl(self) -> str:
    """'auto' -> on XLA:CPU, im2col + GEMM ('gemm') for unrolled blocks and the matmul
    weight gradient ('patches') under vmap or in loops (the stock conv weight gradient
    is ~30x slower there); elsewhere the stock convolution."""
    if self.conv_impl != "auto":
      return self.conv_impl
    if jax.default_backend() != "cpu":
      return "xla"
    looped = self.resolved_formulation() in ("vmap", "scan") or self.resolved_blocks_per_step() < self.T
    return "patches" if looped else "gemm"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
