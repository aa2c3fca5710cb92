"""Real parts the tests run against: an SMTP server with TLS and AUTH, databases."""
