"""Builds the optional C speedups; installing without a C compiler still works (pure-Python fallback)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pywsserver._speedups", ["pywsserver/_speedups.c"], optional=True)])
