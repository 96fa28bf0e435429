"""mome-ray: modular multilingual language models on Ray (after arXiv 2407.19610).

Importing this package has no side effects; Ray workers import it often.
"""

__version__ = "0.1.0"
