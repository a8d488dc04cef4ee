"""dLLM Studio's desktop face: PySide6 windows that drive the engine (`dllm_studio`) from worker threads.

Nothing here computes: pages collect settings, start engine jobs through `Session`, and draw the events
those jobs emit. The engine never imports this package.
"""
