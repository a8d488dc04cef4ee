from dllm_studio.cli import entry

entry()
