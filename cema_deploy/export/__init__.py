"""The export side: timm model -> refittable ONNX + manifest + refit blob v0 (torch, timm, onnx; lazily)."""

from cema_deploy.export.to_onnx import ExportResult, create_timm_model, export_timm, load_weights

__all__ = ["ExportResult", "create_timm_model", "export_timm", "load_weights"]
