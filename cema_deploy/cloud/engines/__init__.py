"""Engines host a service's deployments: ``local`` (threads in this process, the embedded default) and ``ray``
(Ray actors, one per fingerprint; the ``cluster`` extra). Looked up by name, imported only when
chosen (habit 6 in STYLE.md); the HTTP API talks only to :class:`~cema_deploy.cloud.engines.base.Engine`.

Example:
    >>> sorted(list_engines())
    ['local', 'ray']
"""

from __future__ import annotations

import importlib
from typing import Any

from cema_deploy.exceptions import CloudError

#: name -> "module:class"; the class has ``from_config(ServiceConfig) -> Engine``.
ENGINES: dict[str, str] = {
    "local": "cema_deploy.cloud.engines.local:LocalEngine",
    "ray": "cema_deploy.cloud.engines.ray_engine:RayEngine",
}


def list_engines() -> list[str]:
    return sorted(ENGINES)


def get_engine(name: str) -> Any:
    """The engine class registered as ``name``."""
    if name not in ENGINES:
        raise CloudError(f"Unknown engine {name!r}; valid engines: {', '.join(list_engines())}.")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
