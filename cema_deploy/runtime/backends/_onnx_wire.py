"""The dependency-free ONNX reader now lives in :mod:`cema_deploy.contract.onnx_wire` (the contract re-hashes an
export's graph at load with it); this name stays for the backends that import it."""

from cema_deploy.contract.onnx_wire import WireError, WireModel, WireNode, WireTensor, model_from_bytes, model_from_path

__all__ = ["WireError", "WireModel", "WireNode", "WireTensor", "model_from_bytes", "model_from_path"]
