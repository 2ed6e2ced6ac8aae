from seesr_runtime._version import __version__  # one version for both packages

__all__ = ["__version__"]
