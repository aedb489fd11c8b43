"""The edge's link to the cloud: ``client`` (the HTTP client, protocol 2), ``uplink`` (the bounded upload queue
and its worker), ``spool`` (the durable upload spool on disk)."""
