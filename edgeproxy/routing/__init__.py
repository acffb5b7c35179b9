"""
The routing domain: the pure selection, the router that applies bindings,
geo and load accounting per connection, and the binding table.

Nothing here does I/O or imports from L{edgeproxy.net},
L{edgeproxy.stores} or the control plane: it talks to the ports of
L{edgeproxy.interfaces} only.
"""
