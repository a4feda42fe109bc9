"""dpkernels: DP-SGD with fused per-sample gradient norms (ghost clipping), one backward pass."""

from dpkernels.bookkeeping import SecondPassError
from dpkernels.engine import PrivacyEngine
from dpkernels.optimizer import DPOptimizer
from dpkernels.torch_compile import compile

__version__ = "0.1.0"
__all__ = ["DPOptimizer", "PrivacyEngine", "SecondPassError", "__version__", "compile"]
