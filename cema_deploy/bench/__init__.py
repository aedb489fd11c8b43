"""``cema-deploy bench`` as a library: ``table`` (the throughput/latency/ratio table, :func:`run_bench`),
``refit`` (hot-refit timing), ``engines`` (the backends present and the references measured against), ``report``
(the printed table)."""

from cema_deploy.bench.engines import available_backends
from cema_deploy.bench.refit import measure_refit, measure_sustained_refit
from cema_deploy.bench.report import print_report
from cema_deploy.bench.table import run_bench

__all__ = ["available_backends", "measure_refit", "measure_sustained_refit", "print_report", "run_bench"]
