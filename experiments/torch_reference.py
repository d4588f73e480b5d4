"""The PyTorch yardstick: NoProp-DT trained and run the way public PyTorch code does it.

A Python loop over T `nn.Module` blocks of the paper's architecture (unpadded 3x3
convolutions, BatchNorm, dropout 0.2), each with its own AdamW and its own gradient
clipping: per block, z_{t-1} is drawn from the marginal q(z_{t-1} | y), the loss is
the SNR-weighted squared error between softmax(logits) @ W_embed and u_y,
then `backward()`, `clip_grad_norm_` and `step()`. The head's cross-entropy + KL
terms get their own AdamW step, as in this library's step. Inference calls the
blocks one after another, each whole (its image pathway included); the
continuous-time block is called whole at every Euler step.

Used by `benchmark.py` (the PyTorch rows, when torch is importable), which runs it as
its own process (`serve`), and by the tests that pin it to the library's block
(parameter counts). Optional: nothing
else needs torch (`pip install -e '.[torch]'`).
"""

import json
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noprop_jax.schedule import dt_schedule


def _image_path(in_ch: int, size: int, dropout: float, batchnorm: bool) -> nn.Sequential:
  """conv32-pool-conv64-conv128-pool (ReLU, dropout after each), FC256, then BN (DT) or
  ReLU (CT): the library's `ImagePath`."""
  flat = 128 * (((size - 2) // 2 - 4) // 2) ** 2
  return nn.Sequential(
      nn.Conv2d(in_ch, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
      nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Dropout(dropout),
      nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
      nn.Flatten(), nn.Linear(flat, 256), nn.BatchNorm1d(256) if batchnorm else nn.ReLU())


class DTBlock(nn.Module):
  """(x [B, C, H, W], z [B, d]) -> logits [B, m], the paper's discrete-time block."""

  def __init__(self, in_ch: int, size: int, d: int, m: int, dropout: float = 0.2):
    super().__init__()
    self.image = _image_path(in_ch, size, dropout, batchnorm=True)
    self.l1 = nn.Sequential(nn.Linear(d, 256), nn.BatchNorm1d(256), nn.ReLU())
    self.l2 = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
                            nn.Linear(256, 256), nn.BatchNorm1d(256))
    self.fuse = nn.Sequential(nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
                              nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, m))

  def forward(self, x, z):
    h1 = self.l1(z)
    return self.fuse(torch.cat([self.image(x), self.l2(h1) + h1], dim=1))


class CTBlock(nn.Module):
  """(x, z, t [B]) -> logits, the paper's continuous-time block (sinusoidal t embedding)."""

  def __init__(self, in_ch: int, size: int, d: int, m: int, dropout: float = 0.2, t_dim: int = 64):
    super().__init__()
    self.image = _image_path(in_ch, size, dropout, batchnorm=False)
    self.z_fc, self.t_fc, self.t_dim = nn.Linear(d, 256), nn.Linear(t_dim, 256), t_dim
    self.tail = nn.Sequential(nn.Linear(768, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                              nn.Linear(128, m))

  def forward(self, x, z, t):
    half = self.t_dim // 2
    w = 1000.0 * torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    e = torch.cat([torch.sin(t[:, None] * w), torch.cos(t[:, None] * w)], dim=1)
    h = torch.cat([self.image(x), F.relu(self.z_fc(z)), F.relu(self.t_fc(e))], dim=1)
    return self.tail(h)


def num_params(module: nn.Module) -> int:
  """Trainable parameters (BatchNorm's scale and bias included, its statistics not)."""
  return sum(p.numel() for p in module.parameters())


class DT:
  """T DTBlocks, a head and the one-hot embedding, trained block by block."""

  def __init__(self, input_shape, num_classes: int, T: int = 10, eta: float = 0.1,
               lr: float = 1e-3, weight_decay: float = 1e-3, grad_clip: float = 1.0, seed: int = 0,
               device: str = "cpu"):
    torch.manual_seed(seed)
    h, w, c = input_shape
    m = num_classes
    self.T, self.m, self.clip = T, m, grad_clip
    s = dt_schedule(T)
    self.ab, self.a, self.b, self.c = (torch.tensor(np.asarray(v), device=device)
                                       for v in (s.alpha_bar, s.a, s.b, s.c))
    # Eq. 8's weight of block t's squared error: (T / 2) eta (SNR(t) - SNR(t-1)).
    self.weight = torch.tensor(0.5 * T * eta * np.asarray(s.dsnr), device=device)
    self.W = torch.eye(m, device=device)
    self.blocks = nn.ModuleList(DTBlock(c, h, m, m) for _ in range(T)).to(device)
    self.head = nn.Linear(m, m).to(device)
    self.opts = [torch.optim.AdamW(b.parameters(), lr=lr, weight_decay=weight_decay)
                 for b in self.blocks]
    self.head_opt = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=weight_decay)

  def block_step(self, t: int, x, y) -> float:
    """One AdamW step of block t (0-based) on its own term."""
    block = self.blocks[t]
    block.train()
    u = self.W[y]
    z = self.ab[t].sqrt() * u + (1 - self.ab[t]).sqrt() * torch.randn_like(u)  # z_{t-1} ~ q(. | y)
    loss = self.weight[t] * ((F.softmax(block(x, z), dim=1) @ self.W - u) ** 2).sum(1).mean()
    self.opts[t].zero_grad(set_to_none=True)
    loss.backward()
    if self.clip:
      nn.utils.clip_grad_norm_(block.parameters(), self.clip)
    self.opts[t].step()
    return loss.detach()

  def head_step(self, y) -> float:
    """CE of the head on z_T ~ q(z_T | y), and the (constant, one-hot) KL term."""
    u = self.W[y]
    z = self.ab[-1].sqrt() * u + (1 - self.ab[-1]).sqrt() * torch.randn_like(u)
    loss = F.cross_entropy(self.head(z), y)
    self.head_opt.zero_grad(set_to_none=True)
    loss.backward()
    self.head_opt.step()
    return loss.detach()

  def step(self, x, y) -> None:
    """Every block once, one after another, then the head: one step's block updates."""
    for t in range(self.T):
      self.block_step(t, x, y)
    self.head_step(y)

  @torch.no_grad()
  def predict(self, x):
    """The mean path: z_0 = 0, z_t = a_t softmax(block_t(x, z_{t-1})) W + b_t z_{t-1}."""
    z = torch.zeros(x.shape[0], self.m, device=x.device)
    for t, block in enumerate(self.blocks):
      block.eval()
      z = self.a[t] * (F.softmax(block(x, z), dim=1) @ self.W) + self.b[t] * z
    return self.head(z)


class FM:
  """One CTBlock integrated by Euler steps (NoProp-FM's mean-path inference)."""

  def __init__(self, input_shape, num_classes: int, steps: int = 1000, seed: int = 0,
               device: str = "cpu"):
    torch.manual_seed(seed)
    h, w, c = input_shape
    self.m, self.steps = num_classes, steps
    self.block = CTBlock(c, h, num_classes, num_classes).to(device)

  @torch.no_grad()
  def predict(self, x):
    """z_0 = 0, then z += dt v(x, z, t) over `steps` Euler steps with the velocity the
    block's output (one-hot embedding), the block called whole each time."""
    self.block.eval()
    z, dt = torch.zeros(x.shape[0], self.m, device=x.device), 1.0 / self.steps
    for i in range(self.steps):
      z = z + dt * self.block(x, z, torch.full((x.shape[0],), i * dt, device=x.device))
    return z


# ----------------------------------------------------------------------------- timing

def batch(input_shape, num_classes: int, batch_size: int, seed: int = 0, device: str = "cpu"):
  """Random pixels in [0, 1] (NCHW) and labels, the benchmark's data."""
  g = torch.Generator().manual_seed(seed)
  h, w, c = input_shape
  x = torch.randint(0, 256, (batch_size, c, h, w), generator=g).float() / 255.0
  return x.to(device), torch.randint(0, num_classes, (batch_size,), generator=g).to(device)


def median_time(fn, repeats: int) -> float:
  """Median seconds of `fn()` over `repeats` calls, after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def timers(input_shape, num_classes: int, batch_size: int, T: int, fm_batch: int,
           fm_steps: int, device: str = "cpu") -> dict:
  """name -> a function running it once: 'step' (every block once, then the head: one
  parallel step's updates), 'block_step' (the next block's step and the head's: one step of
  Algorithm 1), 'dt_predict' (a batch through the T whole blocks), 'fm_predict' (`fm_steps`
  Euler steps of the whole CT block on `fm_batch` images). On a GPU ('cuda') each call
  waits for the device before it returns, so that it can be timed."""
  model = DT(input_shape, num_classes, T, device=device)
  fm = FM(input_shape, num_classes, fm_steps, device=device)
  x, y = batch(input_shape, num_classes, batch_size, device=device)
  x_fm = x[:fm_batch]
  blocks = iter(range(10**12))

  def block_step():
    model.block_step(next(blocks) % T, x, y)
    model.head_step(y)

  fns = {"step": lambda: model.step(x, y), "block_step": block_step,
         "dt_predict": lambda: model.predict(x), "fm_predict": lambda: fm.predict(x_fm)}
  if device == "cpu":
    return fns
  waited = lambda fn: lambda: (fn(), torch.cuda.synchronize())
  return {k: waited(fn) for k, fn in fns.items()}


def serve(spec: dict) -> None:
  """Time on request, in this process, as `benchmark.py` asks through stdin/stdout.

  `spec`: the `timers` arguments (`device` 'cpu' or 'cuda') and `threads`. Writes one
  JSON line {"torch": version, "device": its name} once ready, then answers each request line "ITEM N" (ITEM a `timers` key) with one JSON
  line: the N seconds of N timed calls, after one untimed call. The benchmark runs PyTorch
  here, in a process of its own, because importing `noprop_jax` changes the process's
  malloc settings (`noprop_jax.host_memory`): a PyTorch user's process has glibc's defaults.
  """
  torch.set_num_threads(spec.pop("threads"))
  timed = timers(**spec)
  device = spec.get("device", "cpu")
  name = torch.cuda.get_device_name() if device != "cpu" else "cpu"
  print(json.dumps({"torch": torch.__version__, "device": name}), flush=True)
  for line in sys.stdin:
    item, n = line.split()
    # Untimed: the other process's threads may still be spinning, or its caches warm.
    timed[item]()
    times = []
    for _ in range(int(n)):
      t0 = time.perf_counter()
      timed[item]()
      times.append(time.perf_counter() - t0)
    print(json.dumps(times), flush=True)


if __name__ == "__main__":
  # python torch_reference.py --serve '{"input_shape": [28, 28, 1], ...}' (benchmark.py's child)
  if sys.argv[1:2] != ["--serve"] or len(sys.argv) != 3:
    sys.exit("usage: torch_reference.py --serve SPEC_JSON (run by experiments/benchmark.py)")
  spec = json.loads(sys.argv[2])
  spec["input_shape"] = tuple(spec["input_shape"])
  serve(spec)
