"""
edgeproxy: a geo-aware L4 (TCP) edge proxy framework on Twisted.
"""

__version__ = "0.1.0.dev0"
