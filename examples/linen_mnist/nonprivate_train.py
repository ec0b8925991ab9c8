"""MNIST example: Flax's Linen MNIST example (google/flax examples/mnist at 772d9974),
written anew, trained with DP-SGD by dpjax (train.py) or without privacy (nonprivate_train.py;
`diff -u nonprivate_train.py train.py` is what privacy changes). The data comes from dpjax's MNIST
reader (the files in $DPJAX_DATA_DIR, no download), the summaries go to tensorboardX.
"""

from absl import logging
from flax import linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


@jax.jit
def update_model(state, grads):
  return state.apply_gradients(grads=grads)


def train_epoch(state, train_ds, batch_size, rng):
  """Trains for one pass over a random permutation (the last incomplete batch skipped)."""
  steps_per_epoch = len(train_ds['image']) // batch_size
  perms = jax.random.permutation(rng, len(train_ds['image']))
  perms = perms[: steps_per_epoch * batch_size].reshape((steps_per_epoch, batch_size))
  epoch_loss, epoch_accuracy = [], []
  for perm in perms:
    grads, loss, accuracy = apply_model(
        state, train_ds['image'][perm], train_ds['label'][perm])
    state = update_model(state, grads)
    epoch_loss.append(loss)
    epoch_accuracy.append(accuracy)
  return state, np.mean(epoch_loss), np.mean(epoch_accuracy)


def get_datasets():
  """Loads MNIST's train and test splits into memory, images scaled to [0, 1]."""
  datasets = []
  for split in ('train', 'test'):
    ds = dpjax.data.load_dataset('mnist', split)
    datasets.append({'image': jnp.float32(ds.images) / 255.0, 'label': jnp.asarray(ds.labels)})
  return datasets


def create_train_state(rng, config):
  """Creates the initial `TrainState`."""
  cnn = CNN()
  params = cnn.init(rng, jnp.ones([1, 28, 28, 1]))['params']
  tx = optax.sgd(config.learning_rate, config.momentum)
  return train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> train_state.TrainState:
  """Trains for config.num_epochs epochs, evaluating on the test set after each.

  Args:
    config: the hyperparameters (configs/default.py).
    workdir: where the TensorBoard summaries are written.

  Returns:
    The final train state.
  """
  train_ds, test_ds = get_datasets()
  rng = jax.random.key(0)
  summary_writer = SummaryWriter(workdir)
  rng, init_rng = jax.random.split(rng)
  state = create_train_state(init_rng, config)

  for epoch in range(1, config.num_epochs + 1):
    rng, input_rng = jax.random.split(rng)
    state, train_loss, train_accuracy = train_epoch(
        state, train_ds, config.batch_size, input_rng)
    _, test_loss, test_accuracy = apply_model(state, test_ds['image'], test_ds['label'])
    logging.info(
        'epoch:% 3d, train_loss: %.4f, train_accuracy: %.2f, test_loss: %.4f,'
        ' test_accuracy: %.2f',
        epoch, train_loss, train_accuracy * 100, test_loss, test_accuracy * 100)
    summary_writer.add_scalar('train_loss', train_loss, epoch)
    summary_writer.add_scalar('train_accuracy', train_accuracy, epoch)
    summary_writer.add_scalar('test_loss', test_loss, epoch)
    summary_writer.add_scalar('test_accuracy', test_accuracy, epoch)

  summary_writer.flush()
  return state
