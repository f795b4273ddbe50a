"""The project's one HTTP client (``http``): sinks post with it, sources poll with it, imports
fetch with it."""
