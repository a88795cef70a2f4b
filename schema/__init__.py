"""Alembic migrations of increment-service (installed as ``increment_service.schema``)."""
