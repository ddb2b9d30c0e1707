"""Building blocks: one concern per file."""
