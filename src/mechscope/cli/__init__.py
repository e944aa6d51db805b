"""The ``mechscope`` command: the only place that parses argv or prints."""
