"""Layer 9, interop: the outside world and the entry. Hugging Face import and export (``hf/``), the exported
model format (``export``), and the entry (``entry``): resolve a composed config once and assemble a trainer
from the components of every layer below.

It may import every layer below it.
"""
