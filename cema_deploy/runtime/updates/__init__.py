"""Parameter updates on the edge: ``intake`` (poll -> verify -> validate), ``scheduler`` (coalescing refits),
``rollback`` (judging a refit on identical inputs), ``state`` (durable edge state), ``generation`` (the
deployment's generation and calibration as the edge sees them)."""
