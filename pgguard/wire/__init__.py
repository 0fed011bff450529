"""pgguard.wire package."""
