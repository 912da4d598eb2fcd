"""Shim for tools that look for a setup.py: the build is configured in pyproject.toml (PEP 621,
setuptools backend), which ``pip install -e .`` reads; this file adds nothing to it."""
from setuptools import setup

setup()
