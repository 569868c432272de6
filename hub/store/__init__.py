"""The adapter store: versioned, checksummed bundles on disk and their metadata."""
