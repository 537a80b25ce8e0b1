import sys

from dar_jax.evaluate.command import main

sys.exit(main())
