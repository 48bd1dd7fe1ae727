"""Examples for peft-decaylora (not part of the installed package).

This file only makes ``examples.assets`` importable from the repository root.
"""
