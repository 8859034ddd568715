# All metadata lives in pyproject.toml; this file only lets older tools run `python setup.py ...`.
from setuptools import setup

setup()
