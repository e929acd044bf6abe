"""The method contract, the registry and shared building blocks. No method lives here (style.md §0 (c))."""

from methods.base import Accounting, Ancestry, ArchSpec, Method, MethodConfig, MethodError, Task
from methods.registry import get_method, get_method_class, list_methods, register_method

__all__ = [
    "Accounting", "Ancestry", "ArchSpec", "Method", "MethodConfig", "MethodError", "Task",
    "get_method", "get_method_class", "list_methods", "register_method",
]
