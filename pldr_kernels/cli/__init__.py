"""The text command lines: ``pldr-generate`` (generate.py), ``pldr-inspect`` (inspect.py) and
``pldr-train``; :mod:`._args` is their shared argument checking and error reporting."""
