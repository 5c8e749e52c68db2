"""DeliveryService (internal, service token only) and the background jobs of campaign_service.

The dispatcher holds no database connection: its lanes lease due messages here and report every
outcome back. This package is the database side of guarantees 2 (at most once) and 3 (nothing
lost); `scheduler.py` runs the scheduled starts, the completion sweep and the stalled-dispatch
watchdog.

Modules: `leases` (LeaseMessages), `reports` (ReportDeliveries), `chips` (ReportChipState and
redistribution), `media` (GetMediaContent), `transitions` (automatic COMPLETED / auto-pause,
shared by reports, chips and the scheduler), `servicer` (protobuf <-> domain only), `scheduler`.

Counter semantics on the campaigns row (kept in step in the same transaction as the messages):
- `pending_count`  = messages PENDING + SENDING (not final yet; leasing does not change it);
- `sent_count`     = messages that reached WAHA: SENT + DELIVERED + READ (cumulative);
- `delivered_count`= DELIVERED + READ (cumulative); `read_count` = READ;
- `failed_count`   = FAILED; `skipped_count` = SKIPPED.
So pending + sent + failed + skipped = number of messages, and a receipt never lowers sent_count.

Lock order, everywhere: campaign row first, then message rows. Leases take the campaign row
`FOR KEY SHARE` (conflicts only with `FOR UPDATE`, i.e. Pause/Cancel/Start and the automatic
transitions, not with the counter updates of concurrent reports); reports that change counters
take it `FOR NO KEY UPDATE`; ATTEMPTING-only reports take no campaign lock at all, so a lane can
always record an attempt, even while a Pause holds the row. Waits on the campaign row are bounded
by `LOCK_TIMEOUT`; a timeout is UNAVAILABLE (the dispatcher's client retries those).
"""
