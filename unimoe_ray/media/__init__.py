"""Media decoding shared by every layer that touches raw files: numpy only, no torch, no Ray
at import (preprocessing, training batches and serving all feed the vision tower through it).
"""
