"""
The control plane: the admin HTTP listener (L{edgeproxy.control.admin}) and
what it serves, starting with the Prometheus exposition
(L{edgeproxy.control.metrics}).

It reads the domain and the data plane; nothing below it imports from it.
"""
