"""The one version string of pldr-kernels (setup.py reads it; ``pldr_kernels.__version__``)."""
__version__ = "0.1.0"
