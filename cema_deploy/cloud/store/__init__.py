"""What the cloud keeps on disk: ``state`` (tokens, versions, blobs, snapshots, epochs; atomic writes), ``replay``
(acknowledged uploads and the replay window, frames read back on demand), ``devices`` (what each device served,
uploaded, refused and rolled back), ``edge_stats`` (each device's own BatchNorm statistics, protocol 3)."""
