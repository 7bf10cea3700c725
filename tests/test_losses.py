"""Each loss against an independent numpy computation, including saturated outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipganomaly_jax.training import losses


def np_bce(logits, target):
  """Float64 BCE from the probability, as PyTorch's BCELoss (clamped log at -100)."""
  p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  log_p = np.maximum(np.log(p), -100) if target else 0.0
  log_1mp = np.maximum(np.log1p(-p), -100) if not target else 0.0
  return float(np.mean(-(target * log_p + (1 - target) * log_1mp)))


@pytest.mark.parametrize('target', [0.0, 1.0])
def test_bce_matches_numpy(rng, target):
  logits = rng.normal(0, 3, 37).astype(np.float32)
  np.testing.assert_allclose(
    losses.bce_with_logits(jnp.asarray(logits), target), np_bce(logits, target), rtol=1e-5
  )


@pytest.mark.parametrize('target', [0.0, 1.0])
def test_bce_saturated_is_finite_with_gradient(target):
  logits = jnp.array([-200.0, -40.0, -17.0, 0.0, 17.0, 40.0, 200.0])
  value, grad = jax.value_and_grad(lambda z: losses.bce_with_logits(z, target))(logits)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  # Exact: mean softplus(-z) for target 1 / softplus(z) for target 0, in float64.
  z = np.asarray(logits, np.float64) * (1 if target == 0 else -1)
  np.testing.assert_allclose(value, np.mean(np.logaddexp(0, z)), rtol=1e-6)
  # The wrong side of saturation keeps a gradient (the reference's clamp gives zero).
  assert abs(float(grad[0 if target == 1 else -1])) > 0


def test_contextual_and_latent_match_numpy(rng):
  x, y = rng.uniform(-1, 1, (2, 4, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.contextual_loss(x, y), np.mean(np.abs(x - y)), rtol=1e-5)
  f, g = rng.normal(size=(2, 5, 100)).astype(np.float32)
  np.testing.assert_allclose(losses.latent_loss(f, g), np.mean((f - g) ** 2), rtol=1e-5)


def test_weighted_generator_and_discriminator_losses(rng):
  x, x_hat = rng.uniform(-1, 1, (2, 3, 8, 8, 1)).astype(np.float32)
  real, fake = rng.normal(0, 4, (2, 3)).astype(np.float32)
  f_real, f_fake = rng.normal(size=(2, 3, 10)).astype(np.float32)
  w_adv, w_con, w_lat = rng.uniform(0.5, 60, 3)
  lat = np.mean((f_real - f_fake) ** 2)
  g_total, _ = losses.generator_loss(x, x_hat, fake, f_real, f_fake, w_adv, w_con, w_lat)
  expected = w_adv * np_bce(fake, 1.0) + w_con * np.mean(np.abs(x - x_hat)) + w_lat * lat
  np.testing.assert_allclose(g_total, expected, rtol=1e-5)
  for use_latent in (True, False):
    d_total, terms = losses.discriminator_loss(real, fake, f_real, f_fake, w_lat, use_latent)
    expected = np_bce(real, 1.0) + np_bce(fake, 0.0) + (w_lat * lat if use_latent else 0.0)
    np.testing.assert_allclose(d_total, expected, rtol=1e-5)
    np.testing.assert_allclose(terms['d_lat'], lat, rtol=1e-5)
