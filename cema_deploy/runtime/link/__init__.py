"""The edge's link to the cloud: ``client`` (the HTTP client, protocol 2), ``uplink`` (the bounded upload queue and
its worker), ``entries`` (what it queues and counts), ``delivery`` (sending one entry: retries, holds, drops),
``backoff`` (the retry rule), ``connectivity`` (whether the cloud answers), ``spool`` (the durable queue on disk)."""
