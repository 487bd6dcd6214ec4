"""Command-line utilities: checkpoint converters and equivalence checks."""
