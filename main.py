"""Launch the dLLM Studio desktop app on the bundled demo model (or `python main.py MODEL`).

The headless face of the same engine is the `dllm-studio` command (`dllm-studio --help`).
"""

import sys

from ui.app import main

if __name__ == "__main__":
    sys.exit(main())
