"""SQL for campaign_service, one module per table family. Functions take the caller's Session (the
transaction is the service's), and use set-based statements for anything that scales with contacts."""
