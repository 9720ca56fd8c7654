"""diffrobust: reproducible replication workflow for diffusion-based adversarial robustness papers."""

__version__ = "0.1.0"
