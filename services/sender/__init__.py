"""Sender workers: deliver each job through the tenant's SMTP server and report the outcome."""
