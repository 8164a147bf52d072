"""Audio codec, delay pattern and WAV I/O: torch only, no Ray."""
