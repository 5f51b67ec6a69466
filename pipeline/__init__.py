"""Label-efficient semantic segmentation as a DVC DAG of Ray jobs. The user's commands are
`python -m pipeline.run`, `pipeline.compose` and `pipeline.predict`; the parts and which may
import which are in the README's "Code map" (and tests/test_layout.py)."""
