"""The CEMA cloud (torch, timm, fastapi; the ``cloud`` extra), by job: ``method`` (the math and one step),
``replay`` (durable uploads and the replay window), ``state`` (tokens, blobs, snapshots on disk), ``deployment``
(one model's adaptation loop, one module per job: ``loop`` the class and its step scheduler, ``intake``,
``calibration``, ``publishing``, ``admin``, ``metrics``), ``api`` (HTTP routes over an engine), ``engines``
(``local``: deployments as threads here), ``local_link`` (an in-process CloudLink for the edge runtime)."""
