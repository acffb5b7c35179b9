from twisted.application.service import ServiceMaker

edgeproxy = ServiceMaker(
    "edgeproxy", "edgeproxy.tap", "A geo-aware L4 (TCP) edge proxy.", "edgeproxy"
)
