"""runner: a pytest-style, declarative experiment runner for mechanistic interpretability."""

__version__ = "0.1.0"
