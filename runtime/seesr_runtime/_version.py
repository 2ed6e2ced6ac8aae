# The one version of the project: both packages report it, and pyproject.toml reads it at build time.
__version__ = "0.1.0"
