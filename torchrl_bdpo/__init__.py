"""torchrl_bdpo: Behavior-Regularized Diffusion Policy Optimization (Gao et al., ICML 2025) for TorchRL."""

__version__ = "0.1.0"
