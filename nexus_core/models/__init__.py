"""Model building and loading: tiny presets for offline runs, and the real from_pretrained path."""
