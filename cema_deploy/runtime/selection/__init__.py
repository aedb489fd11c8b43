"""Which frames go up, numpy only: ``rules`` (CEMA's entropy rule and the rules we compare it with), ``budget``
(upload budgets), ``shift`` (the label-free shift detector), ``entropy`` (softmax entropy of logits)."""
