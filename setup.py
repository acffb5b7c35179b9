from setuptools import find_packages, setup

setup(
    name="edgeproxy",
    version="0.1.0.dev0",
    description="A geo-aware L4 (TCP) edge proxy framework on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    classifiers=[
        "Framework :: Twisted",
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Programming Language :: Python :: Implementation :: CPython",
        "Programming Language :: Python :: Implementation :: PyPy",
    ],
    packages=[*find_packages(include=["edgeproxy", "edgeproxy.*"]), "twisted.plugins"],
    package_data={"edgeproxy": ["py.typed", "data/*"], "twisted.plugins": []},
    include_package_data=True,
    install_requires=[
        # edgeproxy relies on private Twisted internals (TLSMemoryBIOProtocol's hooks in
        # edgeproxy/net/tls.py, tcp.Server/Client buffers in net/proxy.py, the epoll
        # reactor's dispatch in net/reactor.py), pinned by tests/test_private_apis.py and
        # friends.  tox tests the ends of the range (23.10.0 and the latest, 26.10.x); widen
        # it only after running the whole suite on the new release.  (With Twisted
        # older than 26, Twisted's own ssl: endpoint, e.g. for --admin over TLS, needs
        # pyOpenSSL < 26; edgeproxy's txsni: listeners work with either.)
        "twisted[tls]>=23.10.0,<27",
        # PyPy 3.9 (Debian bookworm's pypy3): cryptography 43.0.x is the last release
        # with pypy39 wheels; a newer one would build from source and need Rust.  (pip
        # then picks Twisted 25.5.0, the last for Python 3.9, and pyOpenSSL 25.1.0.)
        'cryptography<44; platform_python_implementation == "PyPy" and python_version < "3.10"',
        "zope.interface>=6.0",
        "attrs>=23.1.0",
        "geoip2>=4.7.0",
        # geoip2 brings it; edgeproxy reads databases with it directly.  The
        # database itself ships as package data (edgeproxy/data/*.mmdb).
        "maxminddb>=2.5.0",
        "txsni>=0.2.0",
        "treq>=23.11.0",
        "prometheus_client>=0.16.0",
        "jsonschema>=4.0",
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-twisted>=1.14",
            "hypothesis>=6.90",
            "pytest-timeout>=2.1",
            "dnspython>=2.4",
            "selenium>=4.15",
            # psycopg's binary wheels are CPython's; on PyPy the pure-Python psycopg
            # loads the system's libpq (Debian: libpq5, which postgresql brings).
            'psycopg[binary]>=3.2; platform_python_implementation == "CPython"',
            'psycopg>=3.2; platform_python_implementation != "CPython"',
        ],
        # The PostgreSQL routing table (--db postgresql://...).
        "postgresql": [
            'psycopg[binary]>=3.2; platform_python_implementation == "CPython"',
            'psycopg>=3.2; platform_python_implementation != "CPython"',
        ],
        "dev": [
            "mypy>=1.8",
            "mypy-zope>=1.0.3",
            "ruff>=0.4",
            "towncrier>=23.10",
            "tox>=4.11",
        ],
    },
    entry_points={"console_scripts": ["edgeproxy-ctl = edgeproxy.ctl:main_exit"]},
    zip_safe=False,
)
