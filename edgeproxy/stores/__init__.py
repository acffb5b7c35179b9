"""
Routing-table adapters: one module per store, each an
L{edgeproxy.interfaces.IBackendRepository}.
"""
