"""The DP core: clipping (sensitivity), grad (the clipped gradient shaped like jax.grad), noise
(mechanism), sampling (amplification), accounting (ε, the ledger, the budget guard) and calibration
(σ for a target ε)."""

from dpjax.privacy import accounting, calibration, clipping, grad, noise, sampling
from dpjax.privacy.accounting import PrivacyBudget, PrivacyLedger, epsilon
from dpjax.privacy.calibration import calibrate_noise
from dpjax.privacy.clipping import (AutomaticClip, ClippedSum, FlatClip, GroupClip, NormalizedClip,
                                    clipped_grad_sum, make_clip_rule, per_layer_clip)
from dpjax.privacy.grad import clipped_grad
from dpjax.privacy.noise import add_gaussian_noise, dp_optimizer
from dpjax.privacy.sampling import PoissonSampler, ShuffleSampler
