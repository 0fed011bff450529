"""pgguard.proxy package."""
