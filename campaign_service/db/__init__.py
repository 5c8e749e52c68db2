"""Database access: models, engine and sessions (campaign_service owns PostgreSQL)."""
