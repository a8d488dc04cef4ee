"""The PySide6 desktop front end: thin widgets over the engine's public API and event streams.

It arrives with the issue "The desktop studio"; the engine (`dllm_studio`) never imports from here.
"""
