"""The bundled demo dLLM: its knowledge base, task-suite generator and training recipe.

    python -m dllm_studio.demo.tasks --out resources/tasks      # regenerate the task suites
    python -m dllm_studio.demo.train --out DIR --seed N         # retrain the demo model
"""
