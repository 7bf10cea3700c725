"""Skip-GANomaly's and GANomaly's losses, computed from logits (numerically stable).

All losses are means over the batch and elements, as in the reference. The reference
applies `BCELoss` to a float32 sigmoid and clamps each log at -100; working from logits
with log-sigmoid instead agrees everywhere except at saturation (|logit| > ~17), where
ours stays finite and keeps a gradient (a deviation: docs/deviations.md).
"""

import jax
import jax.numpy as jnp


def bce_with_logits(logits: jax.Array, target: float) -> jax.Array:
  """Mean binary cross-entropy of sigmoid(logits) against a constant target in {0, 1}.

  Args:
    logits: any shape.
    target: 1.0 for "real", 0.0 for "fake".

  Returns:
    A scalar: mean of -[t log s(z) + (1 - t) log(1 - s(z))], via softplus (no log of a
    saturated sigmoid, no NaN).
  """
  logits = logits.astype(jnp.float32)
  # -log s(z) = softplus(-z); -log(1 - s(z)) = softplus(z).
  return jnp.mean(target * jax.nn.softplus(-logits) + (1.0 - target) * jax.nn.softplus(logits))


def contextual_loss(images: jax.Array, reconstructions: jax.Array) -> jax.Array:
  """L1 reconstruction loss: mean |x - G(x)|."""
  return jnp.mean(jnp.abs(images.astype(jnp.float32) - reconstructions.astype(jnp.float32)))


def latent_loss(features_real: jax.Array, features_fake: jax.Array) -> jax.Array:
  """L2 loss between discriminator features: mean (f(x) - f(G(x)))^2."""
  diff = features_real.astype(jnp.float32) - features_fake.astype(jnp.float32)
  return jnp.mean(jnp.square(diff))


def generator_loss(
  images,
  reconstructions,
  fake_logits,
  features_real,
  features_fake,
  w_adv: float,
  w_con: float,
  w_lat: float,
):
  """Weighted generator loss L_G = w_adv*adv + w_con*con + w_lat*lat.

  Args:
    images: real batch x.
    reconstructions: G(x).
    fake_logits: D's logits on G(x).
    features_real: D's features of x.
    features_fake: D's features of G(x).
    w_adv: adversarial weight.
    w_con: contextual weight.
    w_lat: latent weight.

  Returns:
    (total, terms): the scalar loss and a dict of the unweighted terms.
  """
  terms = {
    'g_adv': bce_with_logits(fake_logits, 1.0),
    'g_con': contextual_loss(images, reconstructions),
    'g_lat': latent_loss(features_real, features_fake),
  }
  total = w_adv * terms['g_adv'] + w_con * terms['g_con'] + w_lat * terms['g_lat']
  return total, terms


def discriminator_loss(
  real_logits, fake_logits, features_real, features_fake, w_lat: float, use_latent: bool
):
  """Discriminator loss BCE(D(x), 1) + BCE(D(G(x)), 0) [+ w_lat * lat].

  The latent term is the reference's behaviour (`config.loss.d_latent`); its gradient is
  taken with respect to D only (the caller differentiates w.r.t. D's parameters).

  Returns:
    (total, terms): the scalar loss and a dict of the unweighted terms.
  """
  terms = {
    'd_real_loss': bce_with_logits(real_logits, 1.0),
    'd_fake_loss': bce_with_logits(fake_logits, 0.0),
    'd_lat': latent_loss(features_real, features_fake),
  }
  total = terms['d_real_loss'] + terms['d_fake_loss']
  if use_latent:
    total = total + w_lat * terms['d_lat']
  return total, terms


# ----------------------------------------------------------------------------- GANomaly
# GANomaly (its authors' code) names its terms differently: its adversarial term is the
# L2 between D's features of x and of G(x) (Skip-GANomaly's latent term; no BCE for G),
# its encoder term the L2 between G's codes of x and of G(x), and D's loss is half the
# sum of the two BCEs.


def ganomaly_generator_loss(
  images,
  reconstructions,
  features_real,
  features_fake,
  latent_i,
  latent_o,
  w_adv: float,
  w_con: float,
  w_enc: float,
):
  """GANomaly's generator loss L_G = w_adv*adv + w_con*con + w_enc*enc.

  Args:
    images: real batch x.
    reconstructions: G(x).
    features_real: D's features of x.
    features_fake: D's features of G(x).
    latent_i: G's code of x (encoder1's), (N, nz).
    latent_o: G's code of G(x) (encoder2's), (N, nz).
    w_adv: weight of adv = mean (f(x) - f(G(x)))^2.
    w_con: weight of con = mean |x - G(x)|.
    w_enc: weight of enc = mean (latent_i - latent_o)^2.

  Returns:
    (total, terms): the scalar loss and a dict of the unweighted terms.
  """
  terms = {
    'g_adv': latent_loss(features_real, features_fake),
    'g_con': contextual_loss(images, reconstructions),
    'g_enc': latent_loss(latent_i, latent_o),
  }
  total = w_adv * terms['g_adv'] + w_con * terms['g_con'] + w_enc * terms['g_enc']
  return total, terms


def ganomaly_discriminator_loss(real_logits, fake_logits):
  """GANomaly's discriminator loss (BCE(D(x), 1) + BCE(D(G(x)), 0)) / 2.

  Returns:
    (total, terms): the scalar loss and a dict of the unweighted terms.
  """
  terms = {
    'd_real_loss': bce_with_logits(real_logits, 1.0),
    'd_fake_loss': bce_with_logits(fake_logits, 0.0),
  }
  return 0.5 * (terms['d_real_loss'] + terms['d_fake_loss']), terms
