"""MNIST tutorial: Flax's NNX MNIST tutorial (google/flax docs_nnx/mnist_tutorial.md at 83e3c21b),
written anew, trained with DP-SGD by dpjax (train.py) or without privacy (nonprivate_train.py;
`diff nonprivate_train.py train.py` is what privacy changes). The data comes from dpjax's MNIST
reader (the files in $DPJAX_DATA_DIR, no download), the summaries go to tensorboardX.

    python train.py /tmp/nnx_mnist  # or nonprivate_train.py
"""

import functools
import sys

from absl import logging
from flax import nnx
import numpy as np
import optax
from tensorboardX import SummaryWriter

import dpjax.data

train_steps = 1200
eval_every = 200
batch_size = 32
learning_rate = 0.005
momentum = 0.9


def load_mnist():
  """MNIST's train and test splits: {'image': float32 [n, 28, 28, 1] in [0, 1], 'label': [n]}."""
  datasets = []
  for split in ('train', 'test'):
    ds = dpjax.data.load_dataset('mnist', split)
    datasets.append({'image': np.float32(ds.images) / 255.0, 'label': np.asarray(ds.labels)})
  return datasets


def make_batches(ds, batch_size, seed=None):
  """Yields batches in order, or of a permutation drawn from `seed`; an incomplete last one is
  dropped."""
  order = np.arange(len(ds['label'])) if seed is None else np.random.default_rng(seed).permutation(
      len(ds['label']))
  for i in range(0, len(order) - batch_size + 1, batch_size):
    rows = order[i:i + batch_size]
    yield {'image': ds['image'][rows], 'label': ds['label'][rows]}


class CNN(nnx.Module):
  """Two 3x3 convolutions (GroupNorm, ReLU, 2x2 average pooling), then two linear layers; dropout
  after the first convolution and the first linear layer (its RNG stream given at construction).
  Upstream normalises with BatchNorm; GroupNorm normalises each example by itself, so the same
  model can be trained with DP (train.py)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.norm1 = nnx.GroupNorm(32, num_groups=8, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.norm2 = nnx.GroupNorm(64, num_groups=8, rngs=rngs)
    self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.norm1(self.dropout1(self.conv1(x)))))
    x = self.avg_pool(nnx.relu(self.norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)  # flatten
    x = nnx.relu(self.dropout2(self.linear1(x)))
    return self.linear2(x)


def loss_fn(model: CNN, batch):
  """Mean cross-entropy of a batch and its logits [n, 10]."""
  logits = model(batch['image'])
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits=logits, labels=batch['label']).mean()
  return loss, logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch):
  """One step on a batch; the model, the optimizer and the metrics are updated in place."""
  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch['label'])
  optimizer.update(model, grads)


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, batch):
  loss, logits = loss_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch['label'])


def train_and_evaluate(workdir, train_steps=train_steps, eval_every=eval_every,
                       batch_size=batch_size, learning_rate=learning_rate):
  """Trains for `train_steps` steps, evaluating on the test set every `eval_every` steps and
  after the last; returns the model and the last test metrics."""
  train_ds, test_ds = load_mnist()
  model = CNN(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(learning_rate, momentum), wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average('loss'))
  train_model = nnx.view(model, deterministic=False)  # dropout on; shares the weights of model
  eval_model = nnx.view(model, deterministic=True)
  writer = SummaryWriter(workdir)

  for step, batch in enumerate(make_batches(train_ds, batch_size, seed=0)):
    if step >= train_steps:
      break
    train_step(train_model, optimizer, metrics, batch)

    if step > 0 and (step % eval_every == 0 or step == train_steps - 1):
      train_metrics = metrics.compute()
      for metric, value in train_metrics.items():
        writer.add_scalar(f'train_{metric}', value, step)
      metrics.reset()
      for test_batch in make_batches(test_ds, batch_size):
        eval_step(eval_model, metrics, test_batch)
      test_metrics = metrics.compute()
      for metric, value in test_metrics.items():
        writer.add_scalar(f'test_{metric}', value, step)
      metrics.reset()
      logging.info('step: %d, train_loss: %.4f, train_accuracy: %.2f, test_loss: %.4f, '
                   'test_accuracy: %.2f', step, train_metrics['loss'],
                   train_metrics['accuracy'] * 100, test_metrics['loss'],
                   test_metrics['accuracy'] * 100)

  writer.flush()
  return model, test_metrics


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  train_and_evaluate(sys.argv[1])
