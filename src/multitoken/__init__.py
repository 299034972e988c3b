"""multitoken."""
