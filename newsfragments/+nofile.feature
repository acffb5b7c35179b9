`twistd edgeproxy` raises its soft file descriptor limit to what `--max-connections` needs (and warns when the hard limit is too low); `--max-connections` is one cap across all listeners.
