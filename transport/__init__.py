"""The transport process: one owner for every connection, I/O threads, framing, workers, write jobs."""
