"""Code shared by the API and the workers: configuration, the job model, Redis keys and store, the prompt."""
