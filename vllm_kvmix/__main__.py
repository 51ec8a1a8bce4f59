import sys

from vllm_kvmix.cli import main

sys.exit(main())
