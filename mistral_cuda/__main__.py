import sys

from mistral_cuda.cli import main

sys.exit(main())
