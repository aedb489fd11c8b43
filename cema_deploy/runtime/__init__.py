"""The edge runtime: torch-free inference backends with atomic hot refit, entropy and sample selection."""

from cema_deploy.runtime.backends.base import Backend, EngineState, RefitReport
from cema_deploy.runtime.backends.registry import get_backend, list_backends

__all__ = ["Backend", "EngineState", "RefitReport", "get_backend", "list_backends"]
