"""The edge's own normalization statistics: ``probe`` (the export's statistics probe on ONNX Runtime) and
``adapter`` (forward-only BatchNorm statistics refitted into the serving engine: ``off``, ``ema``, ``alpha``) and
``labels`` (how concentrated the served predictions are: the ``ema`` prior's label-correlated stream guard)."""
