"""`python -m delf_index COMMAND ...` is the `delf-index` command."""

import sys

from delf_index.pipelines.cli import main

sys.exit(main())
