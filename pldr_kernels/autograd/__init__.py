"""Autograd registrations of the pldr ops (docs/design.md §3.4); importing registers them."""
from . import metric  # noqa: F401
