"""Model math: torch only, no Ray (a test checks it)."""
