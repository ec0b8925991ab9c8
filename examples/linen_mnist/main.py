"""Runs the MNIST example: python main.py --workdir=/tmp/mnist --config=configs/default.py

A thin entry point, as in Flax's examples; the training is in train.py (private) and
nonprivate_train.py (--nonprivate: the same without DP, to compare).
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import nonprivate_train
import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory to store the TensorBoard summaries.')
flags.DEFINE_bool('nonprivate', False, 'Train without differential privacy (the baseline).')
config_flags.DEFINE_config_file(
    'config', None, 'File path to the training hyperparameter configuration.', lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  logging.info('JAX process: %d / %d', jax.process_index(), jax.process_count())
  logging.info('JAX local devices: %r', jax.local_devices())
  if FLAGS.nonprivate:
    nonprivate_train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
