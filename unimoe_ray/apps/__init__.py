"""Applications on top of the library: the `unimoe-ray` CLI, `make demo` (demo, product)."""
