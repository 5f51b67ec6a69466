"""Typed params (params.yaml and its presets), validated once at the edge; imports nothing else of ours."""
