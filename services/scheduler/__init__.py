"""The scheduler accepts emails, warms each server up, spreads sends evenly and publishes jobs."""
