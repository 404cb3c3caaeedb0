"""Builds the optional C speedups; installing without a C compiler still works (pure-Python fallback).

They are not built on Python 3.13 and later: there they do not import as written (a private C API
they use is gone), and made to import they do not agree with their pure-Python twins in the
property tests. Those Pythons run the pure-Python paths until the speedups are ported.
"""

import sys

from setuptools import Extension, setup

speedups = [Extension("pywsserver._speedups", ["pywsserver/_speedups.c"], optional=True)]
setup(ext_modules=speedups if sys.version_info < (3, 13) else [])
