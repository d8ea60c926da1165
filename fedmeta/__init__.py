"""fedmeta: privacy-preserving federated meta-learning."""

from fedmeta.layout import protect as _protect  # a user's server.py/policies/ never shadow ours

_protect()

from fedmeta.newsite import adapt, predict  # noqa: E402,F401  (new-site API)
