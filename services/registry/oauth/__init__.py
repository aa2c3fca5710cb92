"""OAuth 2.0 connections: providers, the client, the connect flow and access tokens."""
