"""The `hub` command line: the one place that imports the library, the tasks and the HTTP server."""
