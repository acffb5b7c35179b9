IPv6 clients are bound to their backend by their /64 (privacy addresses rotate inside it), so one host keeps its backend and cannot fill the binding table.
