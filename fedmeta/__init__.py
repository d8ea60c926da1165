"""fedmeta: privacy-preserving federated meta-learning."""
