import sys

from fcmae.cli import main

sys.exit(main())
