"""Hibernation engines: CRIU checkpoints the process, dill pickles the namespace."""
