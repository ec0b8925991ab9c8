"""The DP core: clipping (sensitivity), noise (mechanism), sampling (amplification), accounting."""

from dpjax.privacy import accounting, clipping, noise, sampling
from dpjax.privacy.accounting import PrivacyBudget, PrivacyLedger, calibrate_noise, epsilon
from dpjax.privacy.clipping import (AutomaticClip, ClippedSum, FlatClip, GroupClip, NormalizedClip,
                                    clipped_grad_sum, make_clip_rule, per_layer_clip)
from dpjax.privacy.noise import add_gaussian_noise, dp_optimizer
from dpjax.privacy.sampling import PoissonSampler, ShuffleSampler
