"""jobs: the Ray layer of facejobs (specs, storage, pipelines, training, CLI)."""
