"""Training state and the data-parallel update step of Skip-GANomaly and GANomaly.

`train_step` is one pure per-device function: forward G and D once, compute the
generator and discriminator losses, update both networks simultaneously from the same
forward pass (as the reference: D's loss uses the reconstruction made before G's step),
and apply the discriminator re-initialisation guard under `lax.cond`.

The two models share all of it but the forward pass and its losses, which the step
takes from `MODEL_LOSSES[spec.model.name]`: `skipganomaly_losses` (the paper's) or
`ganomaly_losses` (the GANomaly authors' step: other loss terms and weights, and D's
running statistics updated as by their four D forwards). Everything else, the
optimiser, the states, the gradients of both losses from one forward pass, the D
re-initialisation guard and the shard_map wrapper, is one code path.

Parallelism: `make_parallel_train_step` maps it over a 1-D device mesh with
`jax.shard_map` under `jax.jit`, not `jax.pmap`. Since JAX 0.8, pmap is implemented on
jit + shard_map and is in maintenance mode; shard_map over a `Mesh` of
`jax.devices()` spans all hosts of a multi-process job with the same code, takes
global `jax.Array`s (built with `jax.make_array_from_process_local_data`), and avoids
pmap's per-leaf dispatch cost and replicate/unreplicate bookkeeping. We keep
`check_vma=True` (JAX's default): each loss is `pmean`-ed over devices *inside* the
differentiated function, so JAX's varying-manual-axes typing yields the gradient of
the global-batch loss directly. (A pmap-style `pmean` of the gradients on top would
scale them by the device count; tests/test_multidevice.py would catch it.) BatchNorm
statistics are averaged over the mesh axis, so N devices with B/N images each equal
one device with B images. State buffers are donated.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from skipganomaly_jax.config import LossSpec, OptimSpec, RunSpecs, compute_dtype
from skipganomaly_jax.nets.models import BN_MOMENTUM, ModelSpec, reinit_params
from skipganomaly_jax.parallel import AXIS
from skipganomaly_jax.training import losses


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm running statistics; `apply_fn` is unused (None)."""

  batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the train step needs: the networks, the loss weights, Adam, the compute dtype.

  Hashable, so the jitted step closes over it as a static value.
  """

  model: ModelSpec = ModelSpec()
  loss: LossSpec = LossSpec()
  optim: OptimSpec = OptimSpec()
  dtype: str = 'float32'

  @classmethod
  def from_specs(cls, specs: RunSpecs, conv_impl: str | None = None) -> 'StepSpec':
    """The step of a run's checked specs (`config.specs(cfg)`); `conv_impl`, if given,
    overrides config.model.conv_impl."""
    model = ModelSpec.from_settings(specs.model, conv_impl)
    return cls(model, specs.loss, specs.optim, specs.train.dtype)


def make_optimizer(optim: OptimSpec) -> optax.GradientTransformation:
  """Adam with the reference's constant learning rate and betas."""
  return optax.adam(optim.lr, b1=optim.b1, b2=optim.b2)


def create_train_states(
  spec: StepSpec, rng: jax.Array, tx: optax.GradientTransformation | None = None
) -> tuple[TrainState, TrainState]:
  """Initial generator and discriminator states (init of docs/method.md, Adam state).

  Args:
    spec: the run's step spec (its networks and optimiser).
    rng: a PRNG key.
    tx: optimizer for both networks (default: `make_optimizer(spec.optim)`).

  Returns:
    (g_state, d_state).
  """
  g_model, d_model = spec.model.generator(), spec.model.discriminator()
  dummy = jnp.zeros((1, spec.model.isize, spec.model.isize, spec.model.nc), jnp.float32)
  g_rng, d_rng = jax.random.split(rng)
  # Jitted: op-by-op initialisation compiles every layer separately (~30 s on CPU).
  g_vars = jax.jit(functools.partial(g_model.init, train=False))(g_rng, dummy)
  d_vars = jax.jit(functools.partial(d_model.init, train=False))(d_rng, dummy)
  tx = make_optimizer(spec.optim) if tx is None else tx
  # No apply_fn: the step builds its models from the spec (with the mesh axis and
  # compute dtype), so a stored model.apply would never be called.
  g_state = TrainState.create(
    apply_fn=None, params=g_vars['params'], batch_stats=g_vars['batch_stats'], tx=tx
  )
  d_state = TrainState.create(
    apply_fn=None, params=d_vars['params'], batch_stats=d_vars['batch_stats'], tx=tx
  )
  return g_state, d_state


def _d_outputs(real_logits, fake_logits) -> dict:
  """D's mean output (a probability) on real and on reconstructed images."""
  return {
    'd_real': jnp.mean(jax.nn.sigmoid(real_logits)),
    'd_fake': jnp.mean(jax.nn.sigmoid(fake_logits)),
  }


def skipganomaly_losses(loss: LossSpec, g_model, d_model, g_vars, d_vars, x):
  """Skip-GANomaly's forward pass of G and D and both losses, on this device's batch.

  Args:
    loss: the loss weights.
    g_model: the generator module (with the mesh axis and compute dtype).
    d_model: the discriminator module, likewise.
    g_vars: G's {'params', 'batch_stats'}.
    d_vars: D's {'params', 'batch_stats'}.
    x: the batch, NHWC in [-1, 1].

  Returns:
    (g_loss, d_loss, g_stats, d_stats, metrics): the two losses of this batch, both
    networks' running statistics after the step, and the unweighted loss terms and D's
    mean outputs.
  """
  x_hat, g_new = g_model.apply(g_vars, x, train=True, mutable=['batch_stats'])
  # D is called separately on x and on G(x): each call normalises a homogeneous batch.
  (real_logits, f_real), d_new = d_model.apply(d_vars, x, train=True, mutable=['batch_stats'])
  # The reference runs D on G(x) twice per step (again in D's backward, same values), so
  # its running statistics take the EMA update of G(x)'s batch statistics twice: we apply
  # it twice in one call rather than pay a third forward pass of D.
  (fake_logits, f_fake), d_new = d_model.apply(
    {'params': d_vars['params'], 'batch_stats': d_new['batch_stats']},
    x_hat,
    train=True,
    stat_updates=2,
    mutable=['batch_stats'],
  )
  g_loss, g_terms = losses.generator_loss(
    x, x_hat, fake_logits, f_real, f_fake, loss.w_adv, loss.w_con, loss.w_lat
  )
  d_loss, d_terms = losses.discriminator_loss(
    real_logits, fake_logits, f_real, f_fake, loss.w_lat, loss.d_latent
  )
  metrics = {**g_terms, **d_terms, **_d_outputs(real_logits, fake_logits)}
  return g_loss, d_loss, g_new['batch_stats'], d_new['batch_stats'], metrics


def repeat_updates(before, after, momentum: float = BN_MOMENTUM):
  """Running statistics after the same EMA updates are applied once more.

  `after` is `before` after updates with batch statistics a, then b (s2 = m^2 s0 +
  m (1 - m) a + (1 - m) b); applying a, then b again gives s4 = m^2 s2 + (s2 - m^2 s0),
  i.e. (1 + m^2) s2 - m^2 s0, without knowing a or b.

  Args:
    before: the running statistics s0 (a pytree).
    after: s2, the same structure.
    momentum: the EMA factor m (Flax's convention: 0.9 = PyTorch's momentum 0.1).
  """
  m2 = momentum * momentum
  return jax.tree.map(lambda s0, s2: (1.0 + m2) * s2 - m2 * s0, before, after)


def ganomaly_losses(loss: LossSpec, g_model, d_model, g_vars, d_vars, x):
  """GANomaly's forward pass and losses, as its authors' step (arguments and returns as
  `skipganomaly_losses`).

  Their step runs G once and D four times in train mode: on x and on G(x) for D's loss,
  then again on x and on G(x) for G's adversarial term (the L2 between D's features;
  G's gradient flows through the second). D's parameters do not change between the
  four, so the last two forwards repeat the first two's outputs and batch statistics: we
  run D twice and apply the two EMA updates of the running statistics once more
  (`repeat_updates`). D's loss is differentiated w.r.t. D only (G(x) is a constant for
  it), G's w.r.t. G only, as the authors' separate backward passes and optimisers do.
  """
  (x_hat, latent_i, latent_o), g_new = g_model.apply(g_vars, x, train=True, mutable=['batch_stats'])
  (real_logits, f_real), d_new = d_model.apply(d_vars, x, train=True, mutable=['batch_stats'])
  (fake_logits, f_fake), d_new = d_model.apply(
    {'params': d_vars['params'], 'batch_stats': d_new['batch_stats']},
    x_hat,
    train=True,
    mutable=['batch_stats'],
  )
  d_stats = repeat_updates(d_vars['batch_stats'], d_new['batch_stats'])
  g_loss, g_terms = losses.ganomaly_generator_loss(
    x, x_hat, f_real, f_fake, latent_i, latent_o, loss.w_adv, loss.w_con, loss.w_enc
  )
  d_loss, d_terms = losses.ganomaly_discriminator_loss(real_logits, fake_logits)
  metrics = {**g_terms, **d_terms, **_d_outputs(real_logits, fake_logits)}
  return g_loss, d_loss, g_new['batch_stats'], d_stats, metrics


# The forward pass and losses of each model (config.model.name); the rest of the step is
# shared.
MODEL_LOSSES = {'skipganomaly': skipganomaly_losses, 'ganomaly': ganomaly_losses}


def _forward_and_losses(spec: StepSpec, axis_name, g_params, d_params, g_stats, d_stats, x):
  """One forward pass of G and D and both losses (each averaged over devices)."""
  dtype = compute_dtype(spec.dtype)
  g_model = spec.model.generator(axis_name=axis_name, dtype=dtype)
  d_model = spec.model.discriminator(axis_name=axis_name, dtype=dtype)
  g_loss, d_loss, g_stats, d_stats, metrics = MODEL_LOSSES[spec.model.name](
    spec.loss,
    g_model,
    d_model,
    {'params': g_params, 'batch_stats': g_stats},
    {'params': d_params, 'batch_stats': d_stats},
    x,
  )
  if axis_name is not None:
    g_loss, d_loss, metrics = jax.lax.pmean((g_loss, d_loss, metrics), axis_name)
  return (g_loss, d_loss), (g_stats, d_stats, metrics)


def train_step(
  g_state: TrainState,
  d_state: TrainState,
  batch: jax.Array,
  rng: jax.Array,
  *,
  spec: StepSpec,
  axis_name: str | None = None,
):
  """One simultaneous update of G and D on a (per-device) batch.

  Args:
    g_state: generator state.
    d_state: discriminator state.
    batch: images, NHWC float32 in [-1, 1] (this device's share of the global batch).
    rng: PRNG key, identical on all devices (feeds the D re-initialisation).
    spec: the run's step spec (static).
    axis_name: the mapped device axis, or None on a single device without mapping.

  Returns:
    (g_state, d_state, metrics): new states and scalar metrics (each loss term, total
    losses, D's mean output on real and reconstructed images, and `d_reinit` in {0, 1}).
  """
  forward = functools.partial(_forward_and_losses, spec, axis_name)
  (g_loss, d_loss), vjp_fn, (g_stats, d_stats, metrics) = jax.vjp(
    lambda gp, dp: forward(gp, dp, g_state.batch_stats, d_state.batch_stats, batch),
    g_state.params,
    d_state.params,
    has_aux=True,
  )
  # Both gradients from the one forward pass at the pre-step parameters. L_G is
  # differentiated w.r.t. G only and L_D w.r.t. D only (G(x) is a constant for D).
  one, zero = jnp.ones_like(g_loss), jnp.zeros_like(g_loss)
  g_grads, _ = vjp_fn((one, zero))
  _, d_grads = vjp_fn((zero, one))
  g_state = g_state.apply_gradients(grads=g_grads, batch_stats=g_stats)
  d_state = d_state.apply_gradients(grads=d_grads, batch_stats=d_stats)
  # The reference's guard against a collapsed D: re-initialise its weights (keeping its
  # running statistics and Adam state) when the pre-step D loss is tiny.
  reinit = d_loss < spec.loss.d_reinit_threshold
  # Under lax.cond the fresh draw is computed only on the (rare) steps that need it;
  # d_loss is averaged over devices, so every device takes the same branch.
  d_params = jax.lax.cond(reinit, lambda p: reinit_params(p, rng), lambda p: p, d_state.params)
  d_state = d_state.replace(params=d_params)
  metrics = {**metrics, 'g_loss': g_loss, 'd_loss': d_loss, 'd_reinit': reinit.astype(jnp.float32)}
  return g_state, d_state, metrics


@jax.jit
def stack_metrics(metrics: list[dict]) -> dict:
  """{name: (n,) array} of n steps' scalar metrics, in one dispatch: the host then
  fetches one array per name rather than n scalars (compiled once per n)."""
  return jax.tree.map(lambda *values: jnp.stack(values), *metrics)


def make_parallel_train_step(spec: StepSpec, mesh: Mesh, fold_in_step: bool = False):
  """`train_step` mapped over the mesh with shard_map, jitted, state buffers donated.

  Args:
    spec: the run's step spec.
    mesh: the 1-D data-parallel mesh.
    fold_in_step: the rng argument is the run's key, and each step uses
      `jax.random.fold_in(rng, g_state.step)`, computed inside the jitted step (the same
      key as folding in the host's step count, without a dispatch of its own per step).

  Returns:
    step(g_state, d_state, batch, rng) -> (g_state, d_state, metrics), where the states
    and rng are replicated and `batch` is a global array sharded over the batch axis
    (see `mesh.shard_batch`).
  """

  def per_device(g_state, d_state, batch, rng):
    if fold_in_step:
      rng = jax.random.fold_in(rng, g_state.step)
    return train_step(g_state, d_state, batch, rng, spec=spec, axis_name=AXIS)

  mapped = jax.shard_map(
    per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS), P()), out_specs=(P(), P(), P())
  )
  return jax.jit(mapped, donate_argnums=(0, 1))
