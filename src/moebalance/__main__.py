import sys

from moebalance.cli import main

sys.exit(main())
