"""UniMoE-Audio on Ray."""
