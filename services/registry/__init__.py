"""The registry verifies and keeps each tenant's SMTP servers and their credentials."""
