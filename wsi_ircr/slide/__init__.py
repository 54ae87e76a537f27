"""Whole-slide path: read, tissue mask, tile grid, tile store, stitch, export (no training code)."""
