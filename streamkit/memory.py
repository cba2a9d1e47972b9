"""The in-memory binder (placeholder; being written)."""
