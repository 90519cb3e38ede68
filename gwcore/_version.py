# This file MUST NOT contain anything but the __version__ assignment: setuptools reads it statically.
__version__ = "0.1.0"
