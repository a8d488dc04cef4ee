import sys

from dllm_studio.cli import main

sys.exit(main())
