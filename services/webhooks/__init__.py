"""The webhooks service: tenants' endpoints, and events delivered to them, signed."""
