"""Generation: torch only, no Ray."""
