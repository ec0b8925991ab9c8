"""The trainer: jitted steps (step.py), run construction (state.py), the loop (loop.py),
checkpoints (checkpoint.py) and metrics (metrics.py)."""

from dpjax.train.loop import train_and_evaluate
from dpjax.train.plan import PrivacyPlan, plan_privacy

__all__ = ["PrivacyPlan", "plan_privacy", "train_and_evaluate"]
