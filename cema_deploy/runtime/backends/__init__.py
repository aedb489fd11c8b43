"""Inference engines with atomic hot refit: the :class:`Backend` interface (``base``), lookup by name
(``registry``), ONNX Runtime (``onnxrt``, ``onnxrt_prepared``, ``_onnx_wire``), ONNX Runtime's TensorRT provider
(``ort_trt``) and native TensorRT (``trt``, ``trt_build``, ``trt_slots``, ``trt_fp16``). Imports nothing from the
uplink (``runtime.link``) or the selection (``runtime.selection``)."""
