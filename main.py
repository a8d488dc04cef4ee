"""Launch dLLM Studio.

Until the desktop window lands (issue "The desktop studio"), this runs the engine's CLI: with no
arguments it generates on the bundled demo model and shows the denoising steps; with arguments it
is `dllm-studio` itself (`python main.py info demo`, `python main.py generate ./model --prompt ...`).
"""

import sys

from dllm_studio.cli import main

DEMO = ["generate", "demo", "--prompt", "What is the capital of France?", "--gen-length", "32", "--show-steps"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or DEMO))
