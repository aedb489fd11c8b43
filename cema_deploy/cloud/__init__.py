"""The CEMA cloud (torch, timm, fastapi; the ``cloud`` extra), by job: ``method`` (the math and one step),
``config`` (every hyperparameter, tagged with its equation), ``models`` (loading the teacher and the edge replica),
``deployment`` (one model's adaptation loop, one module per job: ``loop`` the class and its step scheduler,
``intake``, ``calibration``, ``publishing``, ``admin``, ``operator``, ``metrics``), ``store`` (what lives on disk:
``state``, ``replay``, ``devices``), ``service`` (the serving process: ``api`` routes over an engine, ``openapi``,
``lock``, ``memory``), ``engines`` (``local``: deployments as threads here; ``ray``: as Ray actors), ``local_link``
(an in-process CloudLink for the edge runtime), ``errors`` (refusals with their HTTP status)."""
