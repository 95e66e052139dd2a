"""``python -m bnlab.doctor FILE.py:NAME ...``: the doctor subcommand on its own."""

from bnlab.doctor.command import main

raise SystemExit(main())
