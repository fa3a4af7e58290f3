"""The `fcmae` subcommands, one module each: `add_parser(subparsers)` registers the command's options and `run(args)`
calls the library (fcmae.pretrain, fcmae.finetune, fcmae.knn, ...). fcmae/cli.py lists them; other packages add
theirs through the `fcmae.commands` entry-point group (pyproject.toml), e.g. jobs.cli's `submit`."""
