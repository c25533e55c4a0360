"""Makes the shared PyTorch reference (inception_torch_ref) importable under
any pytest import mode."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
