"""What the API and the workers both use: settings, the job and batch models, Redis keys, the job store, API keys."""
