Graceful shutdown: on SIGTERM edgeproxy stops accepting at once, lets open connections finish for up to `--shutdown-timeout` seconds, closes the rest (logging how many) and exits with status 0.
