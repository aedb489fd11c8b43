"""The cloud side: the CEMA adaptation method and its HTTP service (torch, timm, fastapi)."""
