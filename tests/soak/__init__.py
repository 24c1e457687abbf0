"""The bounded soak: several web and worker processes on a local Redis Cluster, checked for exact
conservation at the end (``nox -s soak``)."""
