# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # NoProp quickstart: your own block, your own arrays
#
# NoProp trains a classifier as **T independent denoising blocks**. Block t gets the
# input x and a noisy version of the label's embedding, and learns to predict the clean
# label. No gradient ever flows from one block to another: there is no forward pass
# through the network in training and no backward pass across it.
#
# In this notebook we:
#
# 1. load scikit-learn's 8x8 handwritten digits as plain NumPy arrays;
# 2. write a small Flax block of our own;
# 3. train NoProp-DT (discrete time) with an ordinary Python loop;
# 4. train the same block, chained and back-propagated end to end, as a baseline;
# 5. train NoProp-FM (flow matching) with a time-conditioned version of the block;
# 6. plot test accuracy per epoch and a few predictions.
#
# This file is a Jupyter notebook with a plain-Python twin, `examples/quickstart.py`
# (jupytext percent format), that holds the same code.

# %%
# Install (once, from the repository root):
#   python -m pip install -e .
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import noprop_jax
from noprop_jax import backprop, dt, fm

EPOCHS = int(os.environ.get("QUICKSTART_EPOCHS", 30))  # passes over the training set
BATCH = 64
print("jax", jax.__version__, "on", jax.devices()[0].device_kind, f"({os.cpu_count()} CPU cores)",
      "| noprop_jax", noprop_jax.__version__)  # the machine the timings below come from

# %% [markdown]
# ## The data: plain arrays
#
# The library takes arrays of any shape `[batch, *input_shape]` (floats, or uint8 pixels
# that it scales to [0, 1]) and integer labels. Here: the 1,797 bundled 8x8 digits,
# flattened to 64 features in [0, 1], with a fixed stratified 80/20 split. Nothing is
# downloaded.

# %%
digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)  # [1797, 64], pixel values 0..16 -> [0, 1]
y_all = digits.target.astype(np.int32)
x_train, x_test, y_train, y_test = train_test_split(
    x_all, y_all, test_size=0.2, stratify=y_all, random_state=0)
print("train", x_train.shape, "test", x_test.shape, "classes", np.bincount(y_train))

# %% [markdown]
# ## Your own block
#
# A NoProp-DT block is any Flax module with `__call__(self, x, z, train=False)` that
# returns class logits `[B, num_classes]`. `z` is the noisy label embedding (here one-hot,
# so 10 numbers). The `train` flag is optional; the library passes `train=True` in training
# steps, so dropout or BatchNorm behave as they should.
#
# This block reads the image through two dense layers, the noisy label through one, and
# mixes both. (A block may also define `features(x)` and `from_features(h, z)` so that
# inference computes the image pathway once rather than at every block step; see
# `noprop_jax.blocks.MLPBlock`. It is optional.)

# %%
class MyBlock(nn.Module):
    num_classes: int = 10
    hidden: int = 128
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, z, train: bool = False):
        h = x.reshape(x.shape[0], -1)
        for _ in range(2):
            h = nn.relu(nn.LayerNorm()(nn.Dense(self.hidden)(h)))
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        hz = nn.relu(nn.Dense(self.hidden)(z))
        h = nn.relu(nn.Dense(self.hidden)(jnp.concatenate([h, hz], axis=-1)))
        return nn.Dense(self.num_classes)(h)


block = MyBlock()

# %% [markdown]
# ## NoProp-DT
#
# `dt.Model` holds the block and the method's settings: T = 10 blocks, each a fresh copy
# of `MyBlock` with its own parameters. Block t is trained on one thing only: given x and
# a label embedding noised to level t - 1, predict the clean embedding (the paper's Eq. 8).
# A small linear head learns to read the class off the last level. All T blocks are
# updated together in one jitted step, but each from its own loss, so they are
# independent: none of them sees another's output in training.
#
# `dt.init` returns the state, a plain dictionary of arrays (parameters, optimizer state,
# step count, random key). `dt.make_train_step` returns a jitted function
# `step(state, x, y) -> (state, metrics)`; it consumes the old state (donated), so always
# keep the returned one.

# %%
dt_model = dt.Model(block, input_shape=(64,), num_classes=10, T=10)
optim = noprop_jax.Optim(lr=1e-3, weight_decay=1e-3)


def accuracy(logits, y):
    return float(np.mean(np.asarray(logits).argmax(-1) == y))


def fit(module, model, seed=0):
    """Shuffled minibatches for EPOCHS epochs; test accuracy after each. Returns (state, curve)."""
    state = module.init(model, jax.random.key(seed), optim=optim)
    step = module.make_train_step(model, optim)
    rng = np.random.default_rng(seed)
    curve = []
    for epoch in range(EPOCHS):
        perm = rng.permutation(len(y_train))
        for i in range(len(perm) // BATCH):  # full batches only: one compiled shape
            idx = perm[i * BATCH:(i + 1) * BATCH]
            state, metrics = step(state, x_train[idx], y_train[idx])
        curve.append(accuracy(module.predict(model, state, x_test), y_test))
    return state, curve


t0 = time.perf_counter()
dt_state, dt_curve = fit(dt, dt_model)
print(f"NoProp-DT: {EPOCHS} epochs in {time.perf_counter() - t0:.1f} s, "
      f"test accuracy {dt_curve[-1]:.4f}")

# %% [markdown]
# ## Prediction
#
# At inference the blocks run in order: z starts as noise and each block moves it
# towards its guess of the label embedding; the head classifies the final z.
# `dt.predict` defaults to the **mean path**: it starts from z_0 = 0 (the mean of the
# noise) and adds no noise between blocks, so the answer is deterministic.
# `mode="stochastic"` is the paper's sampling instead: it draws the noise, and needs a key.
#
# `dt.loss` is the full objective (Eq. 8) on a batch, with its terms: a plain function of
# the parameters, to differentiate, inspect or jit as you like.

# %%
logits = dt.predict(dt_model, dt_state, x_test)  # [360, 10], mean path
sampled = dt.predict(dt_model, dt_state, x_test, key=jax.random.key(1), mode="stochastic")
print("mean path accuracy:", accuracy(logits, y_test))
print("sampled accuracy:  ", accuracy(sampled, y_test))
loss_fn = jax.jit(dt.loss, static_argnums=0)  # the model is a static (hashable) setting
value, terms = loss_fn(dt_model, dt_state["blocks"], dt_state["shared"], x_test, y_test,
                       jax.random.key(2))
print("Eq. 8 on the test set:", float(value), {k: round(float(v), 4) for k, v in terms.items()})

# %% [markdown]
# ## Baseline: the same block, back-propagated
#
# `backprop.Model` chains the same T blocks into one network (each block nudges z towards
# its prediction) and trains it end to end on cross-entropy, with gradients flowing back
# through every block. Same block, same optimizer, same batches and epochs.

# %%
bp_model = backprop.Model(block, input_shape=(64,), num_classes=10, T=10)
t0 = time.perf_counter()
bp_state, bp_curve = fit(backprop, bp_model)
print(f"Backprop: {EPOCHS} epochs in {time.perf_counter() - t0:.1f} s, "
      f"test accuracy {bp_curve[-1]:.4f}")

# %% [markdown]
# ## NoProp-FM: one time-conditioned block
#
# The continuous-time variants use a single block that also takes the time t in [0, 1]
# (a `[B]` array in training). It learns the velocity that carries noise (t = 0) to the
# label embedding (t = 1) along a straight line; inference integrates that velocity with
# Euler steps (50 here; the paper uses 1000). Here the time enters through a few sine
# features. The FM objective and its optimizer (Adam with L2 decay) follow the paper.

# %%
class MyTimeBlock(nn.Module):
    num_classes: int = 10
    hidden: int = 128
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, z, t, train: bool = False):
        h = x.reshape(x.shape[0], -1)
        for _ in range(2):
            h = nn.relu(nn.LayerNorm()(nn.Dense(self.hidden)(h)))
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        freqs = jnp.pi * jnp.arange(1, 9)
        t_emb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
        hz = nn.relu(nn.Dense(self.hidden)(jnp.concatenate([z, t_emb], axis=-1)))
        h = nn.relu(nn.Dense(self.hidden)(jnp.concatenate([h, hz], axis=-1)))
        return nn.Dense(self.num_classes)(h)


fm_model = fm.Model(MyTimeBlock(), input_shape=(64,), num_classes=10, inference_steps=50)
t0 = time.perf_counter()
fm_state, fm_curve = fit(fm, fm_model)
print(f"NoProp-FM: {EPOCHS} epochs in {time.perf_counter() - t0:.1f} s, "
      f"test accuracy {fm_curve[-1]:.4f}")

# %% [markdown]
# ## Results
#
# Test accuracy after each epoch for the three methods, then the first test digits with
# NoProp-DT's predictions (wrong ones in red).

# %%
epochs = np.arange(1, EPOCHS + 1)
fig, ax = plt.subplots(figsize=(6, 3.5))
for curve, label in ((dt_curve, "NoProp-DT"), (bp_curve, "Backprop"), (fm_curve, "NoProp-FM")):
    ax.plot(epochs, curve, marker=".", label=label)
ax.set(xlabel="epoch", ylabel="test accuracy", title="8x8 digits, MyBlock")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

pred = np.asarray(logits).argmax(-1)
fig, axes = plt.subplots(1, 8, figsize=(8, 1.6))
for ax, img, p, y in zip(axes, x_test, pred, y_test):
    ax.imshow(img.reshape(8, 8), cmap="gray_r")
    ax.set_title(f"{p}" if p == y else f"{p} (true {y})", color="k" if p == y else "r", fontsize=9)
    ax.axis("off")
plt.show()

# %%
print(f"final test accuracy NoProp-DT: {dt_curve[-1]:.4f}")
print(f"final test accuracy Backprop: {bp_curve[-1]:.4f}")
print(f"final test accuracy NoProp-FM: {fm_curve[-1]:.4f}")
