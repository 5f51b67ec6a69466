import os

# Ray asks about usage stats on first start; tests never answer prompts.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
