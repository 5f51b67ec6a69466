"""Where stages run and what they record: Ray sessions, the execution's shared local Ray, storage, MLflow tracking."""
