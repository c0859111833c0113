"""The shared kernel: settings, errors, the reading type, retry, metrics and logging.

Nothing here imports any other part of the project.
"""
