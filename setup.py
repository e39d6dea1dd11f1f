"""Packaging for Dobbin: the embedded object store and its ZeroMQ broker."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def read(name):
    path = os.path.join(here, name)
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


setup(
    name="dobbin",
    version="0.1.0",
    description="Embedded transactional object database for Python, "
                "with a ZeroMQ broker",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dobbin*", "broker*"]),
    # Makes editable installs a plain path .pth pointing at this directory
    # rather than an import-hook finder: buildout's develop eggs only honour
    # the former (bin/py could not import dobbin without it).
    package_dir={"": "."},
    install_requires=[
        "transaction >= 3.0",  # abort hooks (broker.serverside)
        "zope.interface",
        "pyzmq",
        "msgpack",
        "zlib-ng",  # fast crc32 (dobbin.record)
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "bench": ["ZODB", "ZEO", "BTrees", "Durus", "matplotlib"],
    },
    entry_points={
        "console_scripts": ["dobbin = dobbin.cli:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Database",
    ],
)
