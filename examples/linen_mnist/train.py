"""MNIST example: Flax's Linen MNIST example (google/flax examples/mnist at 772d9974),
written anew, trained with DP-SGD by dpjax (train.py) or without privacy (nonprivate_train.py;
`diff -u nonprivate_train.py train.py` is what privacy changes). The data comes from dpjax's MNIST
reader (the files in $DPJAX_DATA_DIR, no download), the summaries go to tensorboardX.
"""

import functools

from absl import logging
from flax import linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax
from tensorboardX import SummaryWriter

import dpjax.data


class CNN(nn.Module):
  """Two 3x3 convolutions with average pooling, then two dense layers (no BatchNorm)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    return nn.Dense(features=10)(x)


def loss_fn(params, images, labels):
  """Mean cross-entropy of a batch: images float32 [n, 28, 28, 1], labels int32 [n]."""
  logits = CNN().apply({'params': params}, images)
  loss = jnp.mean(optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 10)))
  return loss, logits


@jax.jit
def apply_model(state, images, labels):
  """Returns the gradients, loss and accuracy of one batch."""
  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, images, labels)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return grads, loss, accuracy


@functools.partial(jax.jit, static_argnums=0)
def clipped_grads(grad_fn, state, images, labels, mask):
  """The sum of the batch's per-example gradients, each clipped (padding rows masked out)."""
  return grad_fn(state.params, images, labels, mask=mask).grad


@jax.jit
def update_model(state, grads):
  return state.apply_gradients(grads=grads)


def train_epoch(state, train_ds, private, steps):
  """Trains on `steps` Poisson batches of the private setup (the ledger records each)."""
  for batch in private.batches(steps):
    grads = clipped_grads(private.grad_fn, state, train_ds['image'][batch.indices],
                          train_ds['label'][batch.indices], batch.mask)
    state = update_model(state, grads)
  return state


def get_datasets():
  """Loads MNIST's train and test splits into memory, images scaled to [0, 1]."""
  datasets = []
  for split in ('train', 'test'):
    ds = dpjax.data.load_dataset('mnist', split)
    datasets.append({'image': jnp.float32(ds.images) / 255.0, 'label': jnp.asarray(ds.labels)})
  return datasets


def create_train_state(rng, config, private):
  """Creates the initial `TrainState`."""
  cnn = CNN()
  params = cnn.init(rng, jnp.ones([1, 28, 28, 1]))['params']
  tx = private.optimizer
  return train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> train_state.TrainState:
  """Trains for config.num_epochs epochs, evaluating on the test set after each.

  Args:
    config: the hyperparameters (configs/default.py).
    workdir: where the TensorBoard summaries are written.

  Returns:
    The final train state and the private setup (`.epsilon()`, `.statement()`).
  """
  train_ds, test_ds = get_datasets()
  rng = jax.random.key(0)
  summary_writer = SummaryWriter(workdir)
  rng, init_rng = jax.random.split(rng)
  steps = config.steps_per_epoch or len(train_ds['image']) // config.batch_size
  private = dpjax.make_private_with_epsilon(  # Poisson batches, clipping, noise for (ε, δ)
      loss_fn, optax.sgd(config.learning_rate, config.momentum),
      num_examples=len(train_ds['image']), target_epsilon=config.epsilon, delta=config.delta,
      expected_batch_size=config.batch_size, steps=config.num_epochs * steps,
      clip=config.clip_norm, microbatch_size=config.microbatch_size or None, has_aux=True,
      batch_argnums=(1, 2), example_axis='keep', per_example_method='ghost')
  state = create_train_state(init_rng, config, private)

  for epoch in range(1, config.num_epochs + 1):
    state = train_epoch(state, train_ds, private, steps)
    _, test_loss, test_accuracy = apply_model(state, test_ds['image'], test_ds['label'])
    logging.info(
        'epoch:% 3d, test_loss: %.4f, test_accuracy: %.2f, epsilon: %.3f',
        epoch, test_loss, test_accuracy * 100, private.epsilon())
    summary_writer.add_scalar('epsilon', private.epsilon(), epoch)
    summary_writer.add_scalar('test_loss', test_loss, epoch)
    summary_writer.add_scalar('test_accuracy', test_accuracy, epoch)

  summary_writer.flush()
  logging.info(private.statement())
  return state, private
