"""``cema-deploy demo``: the whole CEMA loop on a shifted stream built from data installed packages ship."""
