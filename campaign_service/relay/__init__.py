"""The relay: reads the outbox and fans every event out (Redis pub/sub, webhook deliveries), then
delivers the webhooks. Runs as asyncio tasks inside each campaign_service process; one replica at
a time leads (a PostgreSQL advisory lock), the others stand by, so nothing is relayed twice."""
