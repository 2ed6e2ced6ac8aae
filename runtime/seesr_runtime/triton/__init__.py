"""Triton Inference Server support files (torch-free).

``model.py`` here is not imported by the runtime: ``seesr-export triton`` copies it into a
generated model repository as ``<model>/1/model.py``, where Triton's Python backend loads it.
"""
from pathlib import Path

MODEL_FILE = Path(__file__).with_name("model.py")
