"""pgguard.policy package."""
