"""Build script: the optional C++ CPU extension fastlora._C (see csrc/)."""

from setuptools import setup

setup()
