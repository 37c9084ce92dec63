"""tunelab's Hydra plugins (Hydra accepts plugins only from the `hydra_plugins` namespace)."""
