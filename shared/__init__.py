"""Code the ABillionLeads services share: settings, database, broker, errors, auth, metrics."""
