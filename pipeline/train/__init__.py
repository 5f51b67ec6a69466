"""Training stages' Ray Train jobs: the launch (driver), the loop (workers), the recipes and their steps."""
