"""Ready-made fabric apps: the quickstart, the API-contract demo, examples."""
