"""
The data plane: the proxied session and its factory, listener endpoints,
the PROXY protocol, TLS termination and the reactor.
"""
