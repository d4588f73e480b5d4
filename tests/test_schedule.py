"""The DT schedule and posterior coefficients against closed forms."""

import math

import numpy as np
import pytest

from conftest import build
from noprop_jax.config import RunConfig
from noprop_jax.schedule import cosine_alpha_bar, dt_schedule


@pytest.mark.parametrize("T", [1, 2, 10, 100])
def test_alpha_bar_runs_from_noise_to_label(T):
  ab = cosine_alpha_bar(T)
  assert ab.shape == (T + 1,)
  assert ab[0] == pytest.approx(1e-4) and ab[-1] == pytest.approx(0.9999)
  assert np.all(np.diff(ab) > 0), "alpha_bar must increase with t (NoProp's direction)"
  s = dt_schedule(T)
  dsnr = np.diff(np.asarray(s.snr, np.float64))
  assert np.all(np.isfinite(s.snr)) and np.all(dsnr > 0)
  assert s.dsnr.shape == (T,) and np.all(np.asarray(s.dsnr) > 0)
  np.testing.assert_allclose(s.dsnr, dsnr, rtol=1e-5)


def test_paper_T10_last_block_input_is_nearly_clean():
  ab = cosine_alpha_bar(10)
  # The last block (t = 10) reads z_9, one step of the cosine schedule from the clean end:
  # cos^2((0.1 + s) / (1 + s) pi / 2) / cos^2(s / (1 + s) pi / 2) with s = 0.008, 0.9721.
  s = 0.008
  want = (math.cos((0.1 + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)) ** 2
  assert ab[9] == pytest.approx(want, rel=1e-12) and ab[9] == pytest.approx(0.9721, abs=1e-4)


@pytest.mark.parametrize("T", [1, 3, 10])
def test_posterior_matches_bayes_rule(T):
  """q(z_t | z_{t-1}, y) from the prior q(z_t | y) and the noising step
  z_{t-1} = sqrt(alpha_{t-1}) z_t + sqrt(1 - alpha_{t-1}) eps, by Bayes' rule."""
  ab = cosine_alpha_bar(T)
  s = dt_schedule(T)
  for t in range(1, T + 1):
    alpha = ab[t - 1] / ab[t]
    prior_var, lik_var = 1 - ab[t], 1 - alpha
    post_var = 1 / (1 / prior_var + alpha / lik_var)
    a = post_var * np.sqrt(ab[t]) / prior_var  # coefficient of u_y
    b = post_var * np.sqrt(alpha) / lik_var  # coefficient of z_{t-1}
    np.testing.assert_allclose(s.c[t - 1], post_var, rtol=1e-5)
    np.testing.assert_allclose(s.a[t - 1], a, rtol=1e-5)
    np.testing.assert_allclose(s.b[t - 1], b, rtol=1e-5)
    # Marginalising z_{t-1} ~ q(z_{t-1} | y) must give back q(z_t | y).
    np.testing.assert_allclose(a + b * np.sqrt(ab[t - 1]), np.sqrt(ab[t]), rtol=1e-5)
    np.testing.assert_allclose(b**2 * (1 - ab[t - 1]) + post_var, 1 - ab[t], rtol=1e-5)


def test_schedule_rejects_collapsed_steps():
  with pytest.raises(ValueError, match="increase strictly"):
    dt_schedule(400)  # near t = T neighbouring steps clip to the same alpha_bar


def test_schedule_clip_sets_the_ends():
  ab = np.asarray(dt_schedule(5, 1e-3, 0.99).alpha_bar)
  assert ab[0] == pytest.approx(1e-3) and ab[-1] == pytest.approx(0.99)


@pytest.mark.parametrize("overrides, match", [
    (dict(T=0), "T >= 1"),
    (dict(lr=-1e-3), "learning rate must be > 0"),
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'"),
    (dict(method="ddpm"), "unknown method 'ddpm'"),
    (dict(method="adjoint", embedding="learned"), "--embedding is a setting of .*not of adjoint"),
    (dict(method="ct", classifier="radial"), "--classifier is a setting of dt, not of ct"),
    (dict(classifier="cosine"), "unknown classifier"),
    (dict(embedding="prototype", embedding_dim=20), r"the input size \(product of input_shape\) \(64\)"),
    (dict(radial_sigma=0.0), "radial_sigma must be > 0"),
    (dict(embedding="onehot", embedding_dim=20), "must equal the number of classes"),
    (dict(embedding="random"), "unknown embedding"),
    (dict(alpha_bar_min=0.0), "SNR is finite"),
    (dict(batch_size=0), "batch_size"),
    (dict(eta=0.0), "eta"),
])
def test_bad_config_is_a_clear_error(overrides, match):
  """Named by RunConfig.create, or at the latest when the model meets the data's shapes
  (digits: 8 x 8 x 1, 10 classes)."""
  with pytest.raises(ValueError, match=match):
    build(RunConfig.create(**overrides))


def test_paper_defaults_per_dataset():
  assert RunConfig.create(dataset="mnist").train.epochs == 100
  c = RunConfig.create(dataset="cifar100")
  _, model = build(c)
  tr = c.train
  assert (tr.epochs, model.num_classes, model.dim, tr.lr, tr.weight_decay, model.eta, c.T,
          tr.batch_size) == (150, 100, 100, 1e-3, 1e-3, 0.1, 10, 128)
  assert build(RunConfig.create(dataset="cifar10", embedding="learned"))[1].dim == 20
  assert RunConfig.create(method="ct", dataset="cifar10").train.epochs == 500
  assert RunConfig.create(method="adjoint", dataset="mnist").train.epochs == 2
