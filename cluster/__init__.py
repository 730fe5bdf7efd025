"""The serving cluster's edge: for now the `cacheopt` command (cluster/cli.py); the Ray Serve
application comes with issue 5."""
