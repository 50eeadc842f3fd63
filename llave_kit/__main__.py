import sys

from llave_kit.cli import main

sys.exit(main())
