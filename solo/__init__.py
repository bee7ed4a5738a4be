"""solo: pretrain, fine-tune and chat with Transformers in JAX/Flax, under one namespace.

The repository keeps one folder per stage of the flow at its root; they install as
`solo.experiments`, `solo.data`, `solo.model`, `solo.objectives`, `solo.train` and `solo.agent`
(see ARCHITECTURE.md). This package root holds the `solo` command (`solo.cli`) and the XLA
compiler options that training and decoding share (`solo.compile_options`).
"""

__version__ = "0.1.0"
