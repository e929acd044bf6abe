"""The method contract, the registry and shared building blocks. No method lives here (docs/harness.md §7)."""

from methods.base import Accounting, ArchSpec, Export, Method, MethodConfig, MethodError, Task
from methods.registry import get_method, get_method_class, list_methods, register_method

__all__ = [
    "Accounting", "Export", "ArchSpec", "Method", "MethodConfig", "MethodError", "Task",
    "get_method", "get_method_class", "list_methods", "register_method",
]
