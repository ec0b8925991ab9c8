"""python -m dpjax.config: lists every config key with its default and meaning."""

from dpjax import config

print(config.help_text())
