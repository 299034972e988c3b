import sys

from multitoken.cli import main

sys.exit(main())
