"""Makes the analytic oracles importable as ``diffusion_oracles``.

Independent of pytest's import mode (prepend or importlib).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
