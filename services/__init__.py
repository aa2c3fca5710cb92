"""The ABillionLeads sending services: registry, scheduler and sender."""
