"""dpjax: differentially private training with JAX and Flax.

`dpjax.make_private_with_epsilon` (`dpjax/private.py`: the whole private setup of your own training
loop in one call) is imported on first use, so that importing one dpjax module stays light.
"""

_LAZY = {"make_private_with_epsilon": "dpjax.private", "PrivateSetup": "dpjax.private"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'dpjax' has no attribute {name!r}")
