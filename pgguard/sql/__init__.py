"""pgguard.sql package."""
