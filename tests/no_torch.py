"""Prelude for scripts run in a fresh interpreter where any import of torch raises."""

PRELUDE = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is forbidden in the runtime")
sys.meta_path.insert(0, NoTorch())
"""
