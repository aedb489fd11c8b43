"""cema-deploy: cloud-edge elastic model adaptation (CEMA) for real edge deployments."""

__version__ = "0.1.0"
