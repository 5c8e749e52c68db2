"""A lane = (campaign, chip), run as bounded arq job slices (`loop.run_lane`).

The Lane type is built in layers, one module each: `fenced` (state; every WAHA request under the
stop fence) <- `reporting` (outcome reports) <- `chip_health` (chip state, wait for WORKING) <-
`sending` (the send step of one message) <- `bursts` (full speed) <- `leasing` (batch sizes, the
lease, the next batch prefetched) <- `loop` (the slice: lease -> send -> report, and its cleanup).
`common` holds what they share."""
