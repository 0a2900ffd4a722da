"""Adapters to other ecosystems; each imports its library only when used (optional extras)."""
